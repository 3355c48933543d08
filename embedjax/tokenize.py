"""Python-side tokenisation shared by encoding, evaluation and training: the model's own Hugging Face fast
tokenizer, truncation with a count, and padding to a small fixed set of bucket lengths so the number of
XLA compilations stays bounded whatever the input.
"""
from __future__ import annotations

import bisect

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

_BASE_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def bucket_lengths(max_length: int) -> tuple[int, ...]:
    """Sequence-length buckets up to and including `max_length` (x1.5 / x2 steps beyond 512)."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    out = [b for b in _BASE_BUCKETS if b < max_length]
    b = _BASE_BUCKETS[-1]
    while b < max_length:
        b = b * 3 // 2 if (b & (b - 1)) == 0 else b * 4 // 3  # 512, 768, 1024, 1536, 2048 ...
        if b < max_length:
            out.append(b)
    out.append(max_length)
    return tuple(out)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= length (the largest bucket if none is)."""
    i = bisect.bisect_left(buckets, length)      # buckets are sorted ascending
    return buckets[min(i, len(buckets) - 1)]


def load_tokenizer(model_dir: str | os.PathLike) -> Any:
    """The model's fast tokenizer via transformers.AutoTokenizer (tokenizer.json, vocab.txt or spiece.model)."""
    from transformers import AutoTokenizer

    from embedjax.errors import ModelLoadError

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), use_fast=True)
    except Exception as e:
        raise ModelLoadError(f"{model_dir}: cannot load the tokenizer ({type(e).__name__}: {e})") from e
    if not getattr(tok, "is_fast", False):
        raise ModelLoadError(f"{model_dir}: no fast tokenizer could be built (install 'tokenizers'/'sentencepiece')")
    return tok


@dataclass
class Tokenized:
    ids: list[list[int]]          # per text, special tokens included, truncated
    num_truncated: int


class TextTokenizer:
    """Wraps the HF fast tokenizer's Rust backend for fast, truncation-counting batch tokenisation."""

    def __init__(self, hf_tokenizer: Any, max_length: int):
        self.hf = hf_tokenizer
        self.max_length = max_length
        self.pad_id = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else 0
        self._backends: dict[int, Any] = {}

    def _backend(self, max_length: int) -> Any:
        if max_length not in self._backends:
            from tokenizers import Tokenizer

            be = Tokenizer.from_str(self.hf.backend_tokenizer.to_str())
            be.no_padding()
            be.enable_truncation(max_length)
            self._backends[max_length] = be
        return self._backends[max_length]

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> Tokenized:
        max_length = max_length or self.max_length
        encs = self._backend(max_length).encode_batch(list(texts), add_special_tokens=True)
        return Tokenized(ids=[e.ids for e in encs], num_truncated=sum(1 for e in encs if e.overflowing))

    def pad(self, ids: Sequence[Sequence[int]], length: int, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Right-pads to [rows, length] int32 ids and mask (extra rows are all padding)."""
        rows = rows or len(ids)
        out = np.full((rows, length), self.pad_id, np.int32)
        mask = np.zeros((rows, length), np.int32)
        for i, seq in enumerate(ids):
            n = min(len(seq), length)
            out[i, :n] = seq[:n]
            mask[i, :n] = 1
        return out, mask

    def save(self, folder: str | os.PathLike) -> None:
        self.hf.save_pretrained(str(Path(folder)))
