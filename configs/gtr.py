"""GTR-style retrieval fine-tuning (Ni et al. 2021): the pretrained T5 v1.1 encoder (`google/t5-v1_1-SIZE`), mean
pooling, a new 768-d bias-free projection, L2 norm, in-batch softmax with one hard negative per query,
query->document only, temperature 0.01, Adafactor.

    embedjax train --config configs/gtr.py:base --workdir gs://BUCKET/gtr-base \\
        --config.data.path=/path/to/msmarco_triplets.jsonl

Data: JSONL triplets {"query", "positive", "negatives": [...]} (e.g. MS MARCO with mined negatives from
`embedjax mine`). Published result (GTR-Base, BEIR avg nDCG@10): 0.416 (paper, Table 3). Not run here: the
training data and TPU time are not available on the development machine; `:tiny` is exercised by the tests' AOT /
config-loading checks.
"""
from embedjax.config import base_config
from embedjax.recipes import t5_model_config

def get_config(arg=None):
    size = arg or "base"
    c = base_config()
    if size == "tiny":   # a random T5 v1.1 encoder at tiny size (tests; nothing downloaded)
        c.model_config = t5_model_config(size, 64)
        c.tokenizer = "google/t5-v1_1-base"       # SentencePiece vocabulary shared by all T5 v1.1 sizes
    else:                # GTR starts from the pretrained T5 v1.1 encoder, with a new 768-d bias-free projection
        c.init_from = f"google/t5-v1_1-{size}"
        c.model_config = {"head": dict(pooling="mean", projection_dim=768, projection_bias=False, normalize=True)}
    c.dtype = "bfloat16"                          # compute dtype (parameters and optimizer state: float32)
    c.max_query_length = 64
    c.max_document_length = 256
    c.data.kind = "pairs"
    c.data.path = ""
    c.data.num_negatives = 1
    c.batch_size = 2048
    c.num_steps = 20_000
    c.loss.name = "in_batch_softmax"
    c.loss.temperature = 0.01
    c.loss.bidirectional = False
    c.optim.name = "adafactor"
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 1000
    c.optim.weight_decay = 0.0
    c.mesh = dict(data=-1, fsdp=1 if size in ("tiny", "base") else 8, tensor=1)
    c.grad_cache_chunks = 0 if size in ("tiny", "base") else 8
    c.checkpoint_every_steps = 1000
    return c
