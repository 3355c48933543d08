"""A SentencePiece T5 tokenizer folder trained here (shared by the T5 tests)."""
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
