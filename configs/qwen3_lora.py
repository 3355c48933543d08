"""A Qwen3-Embedding-style embedder fine-tuned with LoRA from Qwen3-0.6B (a decoder LLM): causal attention,
last-token pooling (the tokenizer appends <|endoftext|>, whose state is the embedding), L2-normalised, queries
with Qwen3-Embedding's instruction prompt, documents as they are; rank-16 adapters on the attention projections
(the base model frozen: no gradients or optimizer state for its 596M parameters), in-batch softmax over the
global batch on the shipped SciFact train pairs.

    embedjax train --config configs/qwen3_lora.py --workdir gs://BUCKET/qwen3_lora   # a TPU slice
    embedjax aot --config configs/qwen3_lora.py --target v5e-16                       # does it fit?

`:smoke` trains the same architecture at tiny size for a few steps on 8 fake devices; it starts from the
pretrained folder given as `--config.init_from=PATH` (the test writes a tiny Qwen3 checkpoint there first).
`:full` is the same job without LoRA (full fine-tuning), for comparison. Results: none measured (no TPU here);
the AOT memory figures are in README.
"""
from embedjax.config import base_config
from embedjax.data.sources import shipped_path

INSTRUCTION = "Given a scientific claim, retrieve documents that support or refute the claim"


def get_config(arg=None):
    c = base_config()
    c.init_from = "Qwen/Qwen3-0.6B"
    c.model_config = {"head": {"pooling": "lasttoken", "normalize": True}}
    c.data.kind = "beir"
    c.data.path = str(shipped_path("scifact"))
    c.data.split = "train"
    c.data.query_prompt = "Instruct: " + INSTRUCTION + "\nQuery: {text}"
    c.max_query_length = 128
    c.max_document_length = 512
    c.batch_size = 1024
    c.num_steps = 1000
    c.dtype = "bfloat16"
    c.remat_policy = "full"
    c.loss.name = "in_batch_softmax"
    c.loss.temperature = 0.02
    c.loss.bidirectional = False
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.0
    c.mesh.data, c.mesh.fsdp = -1, 4
    c.eval.tasks = (f"beir:{shipped_path('scifact')}:test",)
    c.eval.batch_size = 64
    if arg == "full":
        c.lora.rank = 0
        c.optim.lr = 1e-5
    elif arg == "smoke":
        c.init_from = ""                   # required: --config.init_from=PATH of a tiny Qwen3 checkpoint
        c.max_query_length = 64
        c.max_document_length = 64
        c.batch_size = 16
        c.num_steps = 20
        c.dtype = "float32"
        c.remat_policy = "none"
        c.loss.temperature = 0.05
        c.optim.lr = 2e-2
        c.optim.warmup_steps = 2
        c.mesh.data, c.mesh.fsdp = 2, 4
        c.eval.tasks = ()
    elif arg:
        raise ValueError(f"configs/qwen3_lora.py: unknown variant {arg!r} (none, full, smoke)")
    return c
