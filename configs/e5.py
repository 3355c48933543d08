"""E5-style training (Wang et al. 2022, arXiv 2212.03533), two stages: "query: " / "passage: " prefixes, large-batch
contrastive pre-training on weakly-supervised pairs, then fine-tuning with mined hard negatives.

    embedjax prepare --config configs/e5.py:pre --workdir gs://BUCKET/e5/pre
    embedjax train --config configs/e5.py:pre --workdir gs://BUCKET/e5/pre
    embedjax train --config configs/e5.py:ft --workdir gs://BUCKET/e5/ft --config.init_from=gs://BUCKET/e5/pre
    embedjax export --workdir gs://BUCKET/e5/ft --format sentence-transformers --output e5-base

Starting checkpoint: ``bert-base-uncased`` (E5-base's), mean pooling, L2 norm. Data (replace the placeholders via
``--config.data.sources=[...]``):
* ``pre``: CCPairs-style ``{"query", "positive"}`` pairs (title -> passage, post -> comment, ...), one task per
  source, mixed by example count; in-batch negatives only, temperature 0.01, batch 32k (gradient caching).
* ``ft``: MS MARCO / NQ triplets with mined negatives (``embedjax mine``), ``{"query", "positive",
  "negatives"}``, 7 hard negatives per query as the paper, temperature 0.01.
Published: E5-base, BEIR average nDCG@10 48.7 (after fine-tuning). Not run here (data and TPU time not
available on the development machine). ``:smoke_pre`` / ``:smoke_ft`` are the same recipe on a tiny model
(``--config.init_from=PATH`` and ``--config.data.sources=[...]`` required).
"""
from embedjax.config import base_config
from embedjax.recipes import smoke_training, stage_variant


def get_config(arg=None):
    smoke, stage = stage_variant("e5.py", arg)
    c = base_config()
    # smoke: --config.init_from=PATH (required); ft: the pre stage's workdir (replace the placeholder)
    c.init_from = "" if smoke else ("bert-base-uncased" if stage == "pre" else "gs://BUCKET/e5/pre")
    c.model_config = {"head": {"pooling": "mean", "normalize": True}}
    c.max_query_length = 32 if smoke else 64
    c.max_document_length = 64 if smoke else 256
    c.data.kind = "files"
    c.data.sources = [] if smoke else (
        [{"name": "ccpairs_reddit", "files": "gs://BUCKET/data/ccpairs/reddit-*.jsonl"},
         {"name": "ccpairs_wiki", "files": "gs://BUCKET/data/ccpairs/wiki-*.jsonl"}] if stage == "pre" else
        [{"name": "msmarco", "files": "gs://BUCKET/data/msmarco/triplets-*.jsonl"},
         {"name": "nq", "files": "gs://BUCKET/data/nq/triplets-*.jsonl"}])
    c.data.query_prompt, c.data.document_prompt = "query: ", "passage: "
    c.data.num_negatives = 0 if stage == "pre" else (1 if smoke else 7)
    c.loss.name = "in_batch_softmax"
    c.loss.temperature = 0.01
    c.loss.mask_false_negatives = True
    c.optim.weight_decay = 0.01
    if smoke:
        smoke_training(c, lr=1e-3, mesh=(8, 1))
    else:
        c.dtype = "bfloat16"
        c.batch_size = 32768 if stage == "pre" else 256
        c.num_steps = 20_000 if stage == "pre" else 3000
        c.optim.lr = 2e-5 if stage == "pre" else 1e-5
        c.optim.warmup_steps = 1000 if stage == "pre" else 400
        c.mesh.data, c.mesh.fsdp = -1, 1
        c.grad_cache_chunks = 32 if stage == "pre" else 0
        c.checkpoint_every_steps = 1000
    return c
