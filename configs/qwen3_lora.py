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
from embedjax.recipes import llm_lora_config

INSTRUCTION = "Given a scientific claim, retrieve documents that support or refute the claim"


def get_config(arg=None):
    c = base_config()
    c.init_from = "Qwen/Qwen3-0.6B"
    c.model_config = {"head": {"pooling": "lasttoken", "normalize": True}}
    c.data.query_prompt = "Instruct: " + INSTRUCTION + "\nQuery: {text}"
    c.loss.bidirectional = False
    return llm_lora_config(c, arg, "qwen3_lora.py")
