"""A tiny random BERT (2 layers, 32 wide) trained on SciFact train pairs: the config tests use.

    embedjax train --config configs/tiny.py --workdir /tmp/tiny

Result: loss falls within 20 steps; nothing to compare against (random init).
"""
from embedjax.config import base_config
from embedjax.data.sources import shipped_path


def get_config(arg=None):
    c = base_config()
    c.model_config = {
        "architecture": "bert",
        "encoder": dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128),
        "head": dict(pooling="mean", normalize=True),
        "max_length": 64,
    }
    c.tokenizer = "sentence-transformers/all-MiniLM-L6-v2"
    c.max_query_length = 32
    c.max_document_length = 64
    c.data.kind = "beir"
    c.data.path = str(shipped_path("scifact"))
    c.batch_size = 16
    c.num_steps = 20
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 2
    c.mesh.data = 8
    c.log_every_steps = 5
    c.export_final = False
    return c
