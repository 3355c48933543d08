"""GTR-style retrieval fine-tuning (Ni et al. 2021): the pretrained T5 v1.1 encoder (`google/t5-v1_1-SIZE`), mean
pooling, a new 768-d bias-free projection, L2 norm, in-batch softmax with one hard negative per query,
query->document only, temperature 0.01, Adafactor.

    embedjax train --config configs/gtr.py:base --workdir gs://BUCKET/gtr-base \\
        --config.data.path=/path/to/msmarco_triplets.jsonl

Data: JSONL triplets {"query", "positive", "negatives": [...]} (e.g. MS MARCO with mined negatives from
`embedjax mine`). Published result (GTR-Base, BEIR avg nDCG@10): 0.416 (paper, Table 3). Not run here: the
training data and TPU time are not available on the development machine; `:tiny` (a random T5 v1.1, nothing
downloaded) is exercised by the tests' AOT / config-loading checks.

Smoke run (tests/test_recipes.py, 8 fake CPU devices as (data 4, fsdp 2)): the same recipe at tiny size from
a tiny pretrained T5 v1.1 folder (any Hugging Face T5 v1.1 folder with its SentencePiece tokenizer), a new
32-d projection, 12 steps of 16 triplets with one hard negative each; the loss falls (41.7 -> 5.5 on the test's
checkpoint, temperature 0.01):

    embedjax train --config configs/gtr.py:smoke --workdir /tmp/gtr_smoke --config.init_from=PATH \\
        --config.data.path=triplets.jsonl

Variants: base (default) | large | xl | xxl (from `google/t5-v1_1-SIZE`) | tiny | smoke.
"""
from embedjax.config import base_config
from embedjax.recipes import T5_SIZES, smoke_training, t5_model_config

VARIANTS = (*T5_SIZES, "smoke")


def get_config(arg=None):
    size = arg or "base"
    if size not in VARIANTS:
        raise ValueError(f"configs/gtr.py: unknown variant {size!r} ({', '.join(VARIANTS)})")
    smoke = size == "smoke"
    c = base_config()
    if size == "tiny":   # a random T5 v1.1 encoder at tiny size (tests; nothing downloaded)
        c.model_config = t5_model_config(size, 64)
        c.tokenizer = "google/t5-v1_1-base"       # SentencePiece vocabulary shared by all T5 v1.1 sizes
    else:                # GTR starts from the pretrained T5 v1.1 encoder, with a new 768-d bias-free projection
        # smoke: --config.init_from=PATH (required), a tiny T5 v1.1 folder
        c.init_from = "" if smoke else f"google/t5-v1_1-{size}"
        c.model_config = {"head": dict(pooling="mean", projection_dim=32 if smoke else 768, projection_bias=False,
                                       normalize=True)}
    c.dtype = "float32" if smoke else "bfloat16"  # compute dtype (parameters and optimizer state: float32)
    c.max_query_length = 32 if smoke else 64
    c.max_document_length = 64 if smoke else 256
    c.data.kind = "pairs"
    c.data.path = ""                              # required: --config.data.path=TRIPLETS.jsonl
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
    if smoke:
        return smoke_training(c, lr=1e-2, mesh=(4, 2))
    c.mesh = dict(data=-1, fsdp=1 if size in ("tiny", "base") else 8, tensor=1)
    c.grad_cache_chunks = 0 if size in ("tiny", "base") else 8
    c.checkpoint_every_steps = 1000
    return c
