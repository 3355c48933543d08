"""Gecko-like dual encoder (Lee et al. 2024, arXiv 2403.20327), two stages, from an LLM in bidirectional mode.

Stage 1, pre-finetuning: large weakly-paired data (title -> passage, question -> answer), in-batch and
same-tower negatives at the largest batch that fits. Stage 2, fine-tuning: a mixture of tasks, each with its
instruction in Gecko's prompt (``task: {task} | query: {text}`` / ``title: {title} | text: {text}``), one task
per batch, one hard negative per query, same-tower negatives, false-negative masks, Matryoshka over 768 and 256
dims. Backbone: Gemma 3 1B (``google/gemma-3-1b-pt``) with bidirectional attention, mean pooling, a 768-d
projection (Gecko-1b-768's shape).

    # data in a bucket (JSONL, Parquet, TFRecord or ArrayRecord shards); tokenise once, then train
    embedjax prepare --config configs/gecko.py:pre --workdir gs://BUCKET/gecko/pre
    embedjax train --config configs/gecko.py:pre --workdir gs://BUCKET/gecko/pre
    embedjax train --config configs/gecko.py:ft --workdir gs://BUCKET/gecko/ft \\
        --config.init_from=gs://BUCKET/gecko/pre
    embedjax export  --workdir gs://BUCKET/gecko/ft --format sentence-transformers --output gecko-768
    embedjax export  --workdir gs://BUCKET/gecko/ft --output gs://BUCKET/serving/gecko-768/1   # TF Serving

The SavedModel tokenises inside the graph with the checkpoint's SentencePiece ``tokenizer.model`` (``<bos>`` in
front, as Gemma's Hugging Face tokenizer; the export checks the two agree on probe texts and stops if not).

Data (replace the paths with yours via --config.data.sources=[...]):
* ``pre``: ``{"query": title or question, "positive": passage}`` pairs, e.g. gs://BUCKET/data/pre/*.jsonl.
* ``ft``: FRet, as ``embedjax synth`` writes it (``{"task": description, "query", "positive", "negatives",
  "scores"}``: the LLM's task description is each row's instruction), plus human-labelled tasks (NQ, HotpotQA,
  FEVER, MedMCQA, SNLI, ...) with an instruction per task. Teacher ``scores`` travel with the batch; this recipe
  trains the in-batch softmax (``loss.name=distill_kl`` distils them instead).
Not run at scale here (data and TPU time not available). ``:smoke_pre`` / ``:smoke_ft`` run the same
architecture at tiny size on 8 fake devices (tests/test_recipes.py), started from a tiny pretrained Gemma 3 with
a Gemma-style SentencePiece tokenizer: ``--config.init_from=PATH`` and ``--config.data.sources=[...]`` are
required there. Measured on that tiny random checkpoint: both losses fall, but only to about the level of
identical embeddings (stage 2: query/positive/negative cosine 1.00 from step 7, accuracy 0), so the smoke run
checks the plumbing (stages, tasks, masks, exports), not learning.
"""
from embedjax.config import base_config
from embedjax.recipes import smoke_training, stage_variant

QUERY_PROMPT = "task: {task} | query: {text}"
DOCUMENT_PROMPT = "title: {title} | text: {text}"


def get_config(arg=None):
    smoke, stage = stage_variant("gecko.py", arg)
    c = base_config()
    # the LLM backbone, switched to bidirectional attention; mean pooling; Gecko's 768-d projection
    # smoke: --config.init_from=PATH (required); ft: the pre stage's workdir (replace the placeholder)
    c.init_from = "" if smoke else ("google/gemma-3-1b-pt" if stage == "pre" else "gs://BUCKET/gecko/pre")
    c.model_config = {"encoder": {"attention": "bidirectional"},
                      "head": {"pooling": "mean", "projection_dim": 64 if smoke else 768, "projection_bias": False,
                               "normalize": True}}
    c.dtype = "float32" if smoke else "bfloat16"
    c.remat_policy = "none" if smoke else "full"
    c.max_query_length = 32 if smoke else 64
    c.max_document_length = 64 if smoke else 512
    c.data.kind = "files"
    c.data.sources = [] if smoke else (
        [{"name": "pre", "files": "gs://BUCKET/data/pre/*.jsonl"}] if stage == "pre" else
        [{"name": "fret", "files": "gs://BUCKET/data/fret/*.jsonl", "fields": {"instruction": "task"}, "rate": 1.0},
         {"name": "nq", "files": "gs://BUCKET/data/nq/*.jsonl", "rate": 0.2,
          "instruction": "Given a question, retrieve Wikipedia passages that answer the question"}])
    c.data.query_prompt, c.data.document_prompt = QUERY_PROMPT, DOCUMENT_PROMPT
    c.data.instruction = "search result"          # evaluation and export: EmbeddingGemma's retrieval prompt
    c.data.one_task_per_batch = True
    c.data.num_negatives = 0 if stage == "pre" else 1
    c.loss.name = "in_batch_softmax"
    c.loss.same_tower = True
    c.loss.mask_false_negatives = True
    c.loss.temperature = 0.05
    c.loss.learn_temperature = stage == "ft"
    if stage == "ft":
        c.loss.matryoshka_dims = (64, 16) if smoke else (768, 256)
    c.optim.weight_decay = 0.0
    if smoke:
        smoke_training(c, lr=2e-3, mesh=(2, 4))
    else:
        c.batch_size = 32768 if stage == "pre" else 4096
        c.num_steps = 20_000 if stage == "pre" else 10_000
        c.optim.lr = 5e-5 if stage == "pre" else 2e-5
        c.optim.warmup_steps = 1000
        c.mesh.data, c.mesh.fsdp = -1, 16
        c.grad_cache_chunks = 16 if stage == "pre" else 4
        c.checkpoint_every_steps = 1000
    return c
