"""Shared helpers for the evaluation tests (imported by conftest and test modules)."""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import numpy as np


class HashEncoder:
    """A tiny deterministic encoder with the ``embedjax.Encoder`` API: hashed bag of words, L2-normalised.

    Counts the texts it embeds per tower, so tests can prove what was (not) re-encoded.
    """

    def __init__(self, dim: int = 64, seed: int = 0, fingerprint: str | None = "hash-encoder-v1") -> None:
        self.dim = dim
        self.seed = seed
        self.fingerprint = fingerprint
        self.name = "hash-encoder"
        self.max_length = 128
        self.calls: list[tuple[str, int]] = []

    def encode(self, texts, batch_size=128, max_length=None, prompt=None, normalize=None, dim=None,
               tower="query", show_progress=None):
        self.calls.append((tower, len(texts)))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            text = (prompt or "") + text
            for tok in re.findall(r"\w+", text.lower()):
                h = zlib.crc32(f"{self.seed}:{tok}".encode())
                out[i, h % self.dim] += 1.0 if (h >> 16) & 1 else -1.0
            out[i, -1] += 0.01  # no all-zero rows
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def n_encoded(self, tower: str | None = None) -> int:
        return sum(n for t, n in self.calls if tower is None or t == tower)


def write_beir(root: Path, corpus: list[dict], queries: list[dict], qrels: list[tuple], split: str = "test") -> Path:
    """Writes a BEIR folder (corpus.jsonl, queries.jsonl, qrels/{split}.tsv with header)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "qrels").mkdir(exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, d, s in qrels]
    (root / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root
