"""Tiny decoder-LLM checkpoints written by the tests (transformers' PyTorch models as the writer): a Qwen3 or
Gemma 3 *ForCausalLM folder with a byte-level BPE tokenizer trained here, as a hub checkpoint looks."""
from pathlib import Path

V = 1000


def _corpus_texts(n: int = 3000) -> list[str]:
    """Shipped SciFact documents and queries (what the smoke runs train on), to learn the merges from."""
    import json

    from embedjax.data.sources import shipped_path

    root = shipped_path("scifact")
    out = []
    for name in ("corpus.jsonl", "queries.jsonl"):
        with open(root / name, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                out.append((row.get("title", "") + " " + row.get("text", "")).strip())
                if len(out) >= n * (1 + (name == "queries.jsonl")):
                    break
    return out


def tokenizer(kind: str):
    """"<pad>" 0, "<eos>" 1, "<bos>" 2; Qwen3's framing (an end-of-text token appended, the state lasttoken
    pools) or Gemma's (a beginning-of-text token in front)."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import TemplateProcessing

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_corpus_texts(), vocab_size=V, min_frequency=2,
                            special_tokens=["<pad>", "<eos>", "<bos>"])
    bpe._tokenizer.post_processor = (TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 1)])
                                     if kind == "qwen3" else
                                     TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<bos>",
                                                eos_token="<eos>", pad_token="<pad>",
                                                model_input_names=["input_ids", "attention_mask"])


def write_checkpoint(kind: str, folder: Path, seed: int = 0) -> Path:
    """A tiny random `kind` ("qwen3" | "gemma3") ForCausalLM folder (safetensors + tokenizer) at `folder`."""
    import torch
    import transformers

    torch.manual_seed(seed)
    if kind == "qwen3":
        cfg = transformers.Qwen3Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
                                       tie_word_embeddings=True)
        model = transformers.Qwen3ForCausalLM(cfg)
    else:
        cfg = transformers.Gemma3TextConfig(
            vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=128, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16, pad_token_id=0,
            eos_token_id=1, bos_token_id=2)
        model = transformers.Gemma3ForCausalLM(cfg)
    model.eval().save_pretrained(str(folder))
    tokenizer(kind).save_pretrained(str(folder))
    return Path(folder)
