"""An EmbeddingGemma / Gecko-style embedder fine-tuned with LoRA from Gemma 3 1B (a decoder LLM) switched to
bidirectional attention (`model_config.encoder.attention`), mean pooling, L2-normalised, with EmbeddingGemma's
prompts ("task: search result | query: ..." / "title: none | text: ..."); rank-16 adapters on the attention
projections (the 1B base frozen), in-batch softmax with same-tower negatives on the shipped SciFact train pairs.

    embedjax train --config configs/gemma3_lora.py --workdir gs://BUCKET/gemma3_lora   # a TPU slice
    embedjax aot --config configs/gemma3_lora.py --target v5e-16                        # does it fit?

`:smoke` trains the same architecture at tiny size for a few steps on 8 fake devices; it starts from the
pretrained folder given as `--config.init_from=PATH` (the test writes a tiny Gemma 3 checkpoint there first).
`:full` is the same job without LoRA. Results: none measured (no TPU here); AOT memory figures in README.
"""
from embedjax.config import base_config
from embedjax.recipes import llm_lora_config


def get_config(arg=None):
    c = base_config()
    c.init_from = "google/gemma-3-1b-pt"
    c.model_config = {"encoder": {"attention": "bidirectional"},
                      "head": {"pooling": "mean", "normalize": True}}
    c.data.query_prompt = "task: search result | query: {text}"
    c.data.document_prompt = "title: {title} | text: {text}"
    c.loss.same_tower = True
    return llm_lora_config(c, arg, "gemma3_lora.py")
