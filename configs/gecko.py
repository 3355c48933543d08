"""Gecko-like multi-task dual encoder (Lee et al. 2024): task prompts ("task: {task} | query: {text}" /
"title: {title} | text: {text}"), in-batch softmax with hard negatives AND same-tower negatives (other queries),
Matryoshka loss over 768 and 256 dims, a learned temperature.

    embedjax train --config configs/gecko.py:base --workdir gs://BUCKET/gecko \\
        --config.data.path=/path/to/fret_triplets.jsonl

Data: JSONL triplets {"query", "positive", "negatives"} (FRet-style LLM-generated / relabelled data).
Published result (Gecko-1b-768, MTEB avg): 66.31. Not run here (data and TPU time not available);
use `:tiny` for a smoke run on the shipped SciFact pairs:

    embedjax train --config configs/gecko.py:tiny --workdir /tmp/gecko_tiny --fake-devices 8
"""
from embedjax.config import base_config
from embedjax.data.sources import shipped_path
from embedjax.recipes import t5_model_config


def get_config(arg=None):
    size = arg or "base"
    c = base_config()
    if size == "tiny":
        c.init_from = "sentence-transformers/all-MiniLM-L6-v2"
        c.data.kind = "beir"
        c.data.path = str(shipped_path("scifact"))
        c.batch_size = 16
        c.num_steps = 5
        c.loss.matryoshka_dims = (384, 128)
        c.max_document_length = 128
    else:
        c.model_config = t5_model_config(size)
        c.dtype = "bfloat16"                      # compute dtype (parameters and optimizer state: float32)
        c.tokenizer = "google/t5-v1_1-base"
        c.data.kind = "pairs"
        c.data.path = ""
        c.data.num_negatives = 1
        c.batch_size = 1024
        c.num_steps = 30_000
        c.loss.matryoshka_dims = (768, 256)
        c.mesh = dict(data=-1, fsdp=1, tensor=1)
        c.max_document_length = 512
    c.data.query_prompt = "task: search result | query: {text}"
    c.data.document_prompt = "title: {title} | text: {text}"
    c.loss.name = "in_batch_softmax"
    c.loss.same_tower = True
    c.loss.temperature = 0.05
    c.loss.learn_temperature = True
    c.optim.lr = 2e-5 if size == "tiny" else 1e-4
    return c
