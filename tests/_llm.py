"""Tiny decoder-LLM checkpoints written by the tests (transformers' PyTorch models as the writer): a Qwen3 or
Gemma 3 *ForCausalLM folder with a tokenizer trained here, as a hub checkpoint looks: byte-level BPE, or for
Gemma 3 optionally a SentencePiece model as Gemma ships (`tokenizer.model`, which has an in-graph form)."""
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


def write_sentencepiece_tokenizer(folder: Path):
    """Gemma's kind of tokenizer, at `folder`: a SentencePiece BPE model trained here with the settings of Gemma 3's
    tokenizer.model (byte fallback, digits split one by one, no dummy prefix, no normalisation, whitespace kept;
    "<pad>" 0, "<eos>" 1, "<bos>" 2, "<unk>" 3), saved as tokenizer.model, and the Hugging Face GemmaTokenizer
    transformers converts from it (tokenizer.json; "<bos>" in front of every text). Returns that tokenizer."""
    import json
    import tempfile

    import sentencepiece as spm
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(_corpus_texts()), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=V, model_type="bpe",
            byte_fallback=True, split_digits=True, add_dummy_prefix=False, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, pad_id=0, eos_id=1, bos_id=2,
            unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", minloglevel=2)
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}))
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))   # converts tokenizer.model
    tok.save_pretrained(str(folder))
    return tok


def write_checkpoint(kind: str, folder: Path, seed: int = 0, *, sentencepiece: bool = False) -> Path:
    """A tiny random `kind` ("qwen3" | "gemma3") ForCausalLM folder (safetensors + tokenizer) at `folder`;
    `sentencepiece` (gemma3 only): Gemma's SentencePiece tokenizer (`write_sentencepiece_tokenizer`) instead of
    the byte-level BPE one."""
    import torch
    import transformers

    if sentencepiece and kind != "gemma3":
        raise ValueError(f"sentencepiece=True is Gemma's tokenizer, not {kind}'s")
    tok = write_sentencepiece_tokenizer(folder) if sentencepiece else tokenizer(kind)
    # the SentencePiece pieces plus what the Hugging Face tokenizer adds to them (GemmaTokenizer's "<mask>")
    vocab = len(tok) if sentencepiece else V
    torch.manual_seed(seed)
    if kind == "qwen3":
        cfg = transformers.Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
                                       tie_word_embeddings=True)
        model = transformers.Qwen3ForCausalLM(cfg)
    else:
        cfg = transformers.Gemma3TextConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=128, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16, pad_token_id=0,
            eos_token_id=1, bos_token_id=2)
        model = transformers.Gemma3ForCausalLM(cfg)
    model.eval().save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return Path(folder)
