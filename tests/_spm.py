"""A SentencePiece T5 tokenizer folder trained here and tiny pretrained T5 checkpoints (shared by the T5 tests)."""
import json
import shutil
from pathlib import Path

import pytest


def make_spm_tokenizer_dir(tmp_path: Path, vocab_size: int = 1000, lines: list[str] | None = None) -> Path:
    """A SentencePiece vocabulary trained with the sentencepiece library (default: on the shipped SciFact titles
    and queries), as a T5 tokenizer folder holding spiece.model (which the in-graph tokenizer reads) and the
    tokenizer.json transformers derives from it."""
    spm = pytest.importorskip("sentencepiece")
    from transformers import T5TokenizerFast

    from embedjax.data.sources import shipped_path

    if lines is None:
        lines = [json.loads(l)["title"] for l in open(shipped_path("scifact", "corpus.jsonl"), encoding="utf-8")]
        lines += [json.loads(l)["text"] for l in open(shipped_path("scifact", "queries.jsonl"), encoding="utf-8")]
    corpus = tmp_path / "spm_corpus.txt"
    corpus.write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "spiece"),
                                   vocab_size=vocab_size, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   model_type="unigram", minloglevel=2)
    out = tmp_path / "tok"
    out.mkdir()
    shutil.copy(tmp_path / "spiece.model", out / "spiece.model")
    # transformers 5: T5TokenizerFast(vocab_file=...) ignores the file; from_pretrained converts spiece.model.
    T5TokenizerFast.from_pretrained(str(out), extra_ids=0).save_pretrained(str(out))
    return out


def write_t5_checkpoint(folder: Path, tokenizer_dir: Path, *, v1_1: bool, seed: int = 0) -> Path:
    """A tiny random pretrained T5 laid out as the hub ships `t5-base` (v1.0: ReLU MLP) or `google/t5-v1_1-base`
    (v1.1: gated GELU): transformers' PyTorch T5ForConditionalGeneration (encoder and decoder) saved as a Hugging
    Face folder, with the SentencePiece tokenizer files of `tokenizer_dir`."""
    import torch
    import transformers

    vocab = len(transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    torch.manual_seed(seed)
    cfg = transformers.T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=1,
                                num_heads=4, feed_forward_proj="gated-gelu" if v1_1 else "relu",
                                dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    transformers.T5ForConditionalGeneration(cfg).eval().save_pretrained(str(folder))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    return Path(folder)
