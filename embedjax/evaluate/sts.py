"""Semantic textual similarity: Spearman / Pearson of cosine similarity against gold scores.

Reads the STS Benchmark in its original format: UTF-8, tab-separated, **no quoting** (sentences contain ``"``),

    genre <TAB> filename <TAB> year <TAB> id <TAB> score <TAB> sentence1 <TAB> sentence2 [<TAB> source fields...]

7 fields, or 9 on lines that carry two trailing source fields. Sentences are kept verbatim (trailing spaces
and mojibake included), as the published numbers were computed on them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from embedjax import errors
from embedjax.evaluate.base import EncodeFn, Evaluator, encode_in_pieces, l2_normalize
from embedjax.progress import progress

STS_MIN_FIELDS = 7


STSFormatError = errors.STSFormatError   # defined in embedjax/errors.py (one module of error types)


@dataclass(frozen=True)
class STSData:
    """Sentence pairs with gold similarity scores."""

    sentences1: list[str]
    sentences2: list[str]
    scores: np.ndarray  # float64 [N]
    source: str = "<memory>"

    def __post_init__(self) -> None:
        n = len(self.sentences1)
        if len(self.sentences2) != n or len(self.scores) != n:
            raise ValueError(
                f"STS data from {self.source}: {n} first sentences, {len(self.sentences2)} second "
                f"sentences and {len(self.scores)} scores; they must match"
            )


def read_stsb(path: str | os.PathLike) -> STSData:
    """Reads an STS-B file (see module docstring). Blank lines are skipped; anything else malformed raises
    :class:`STSFormatError` naming ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"STS file not found: {path}")
    s1: list[str] = []
    s2: list[str] = []
    scores: list[float] = []
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < STS_MIN_FIELDS:
                raise STSFormatError(
                    f"{path}:{lineno}: expected at least {STS_MIN_FIELDS} tab-separated fields "
                    f"(genre, file, year, id, score, sentence1, sentence2), got {len(fields)}"
                )
            try:
                score = float(fields[4])
            except ValueError:
                raise STSFormatError(
                    f"{path}:{lineno}: field 5 (score) is not a number: {fields[4]!r}"
                ) from None
            if not math.isfinite(score):
                raise STSFormatError(f"{path}:{lineno}: field 5 (score) is not finite: {fields[4]!r}")
            for col in (5, 6):
                if not fields[col].strip():
                    raise STSFormatError(f"{path}:{lineno}: field {col + 1} (sentence{col - 4}) is empty")
            scores.append(score)
            s1.append(fields[5])
            s2.append(fields[6])
    if not scores:
        raise STSFormatError(f"{path}: no sentence pairs found")
    return STSData(s1, s2, np.asarray(scores, dtype=np.float64), source=str(path))


def resolve_sts_path(data: str | os.PathLike, split: str = "test") -> Path:
    """``data`` is a file, or a folder holding ``{split}.tsv`` (or the original ``sts-{split}.csv``)."""
    data = Path(data)
    if data.is_file():
        return data
    if not data.is_dir():
        raise FileNotFoundError(f"STS data not found: {data}")
    for name in (f"{split}.tsv", f"sts-{split}.csv", f"{split}.csv"):
        if (data / name).is_file():
            return data / name
    raise FileNotFoundError(f"no STS file for split {split!r} in {data} (looked for {split}.tsv, sts-{split}.csv)")


class STSEvaluator(Evaluator):
    """Cosine similarity of each pair's embeddings against the gold score.

    Returns ``spearman`` and ``pearson`` (fractions in [-1, 1]; Spearman uses average ranks for ties) and
    ``n_pairs``. Each distinct sentence is encoded once, with role ``"query"``.
    """

    main_metric = "spearman"

    def __init__(
        self,
        data: STSData,
        name: str = "sts",
        encode_piece_size: int = 1024,
        show_progress: bool | None = None,
    ) -> None:
        self.data = data
        self.name = name
        self.encode_piece_size = encode_piece_size
        self.show_progress = show_progress

    @classmethod
    def from_file(cls, data: str | os.PathLike, split: str = "test", **kwargs) -> STSEvaluator:
        path = resolve_sts_path(data, split)
        kwargs.setdefault("name", f"stsb-{split}" if Path(data).is_dir() else path.stem)
        return cls(read_stsb(path), **kwargs)

    def similarities(self, encode_fn: EncodeFn) -> np.ndarray:
        """Cosine similarity per pair, float64 [N]."""
        unique = list(dict.fromkeys(self.data.sentences1 + self.data.sentences2))
        index = {s: i for i, s in enumerate(unique)}
        with progress(len(unique), f"encode {self.name}", "sent", self.show_progress) as bar:
            emb_UxD = encode_in_pieces(encode_fn, unique, "query", self.encode_piece_size, bar)
        emb_UxD = l2_normalize(emb_UxD).astype(np.float64)
        a_NxD = emb_UxD[[index[s] for s in self.data.sentences1]]
        b_NxD = emb_UxD[[index[s] for s in self.data.sentences2]]
        return np.einsum("nd,nd->n", a_NxD, b_NxD)

    def run(self, encode_fn: EncodeFn) -> dict[str, float]:
        sims = self.similarities(encode_fn)
        gold = self.data.scores
        if len(gold) < 2 or np.all(gold == gold[0]):
            raise ValueError(f"{self.data.source}: need at least two pairs with different gold scores")
        return {
            "spearman": float(stats.spearmanr(sims, gold).statistic),
            "pearson": float(stats.pearsonr(sims, gold).statistic),
            "n_pairs": float(len(gold)),
        }

