"""Fine-tune all-MiniLM-L6-v2 on the shipped SciFact train pairs (in-batch softmax, negatives gathered across
8 simulated devices), evaluating SciFact test nDCG@10 before and after. The README's main job.

    embedjax train --config configs/minilm_scifact.py --workdir runs/minilm_scifact

Result (2-core CPU, 8 fake devices): SciFact test nDCG@10 64.51 -> see README (target >= 67.0).
Variants: `:tiny` (a few steps, for tests).
"""
from embedjax.config import base_config
from embedjax.data.sources import shipped_path


def get_config(arg=None):
    c = base_config()
    c.init_from = "sentence-transformers/all-MiniLM-L6-v2"
    c.max_query_length = 64
    c.max_document_length = 256
    c.data.kind = "beir"
    c.data.path = str(shipped_path("scifact"))
    c.data.split = "train"
    c.batch_size = 32
    c.num_steps = 58                  # ~2 epochs of the 919 train pairs
    c.loss.name = "in_batch_softmax"
    c.loss.temperature = 0.05
    c.loss.bidirectional = True
    c.optim.lr = 5e-5
    c.optim.warmup_steps = 6
    c.optim.weight_decay = 0.01
    c.eval.tasks = (f"beir:{shipped_path('scifact')}:test",)
    c.log_every_steps = 5
    if arg == "tiny":
        c.num_steps = 3
        c.batch_size = 8
        c.max_document_length = 64
        c.eval.tasks = ()
    return c
