"""Hard-negative mining, the core of ``embedjax mine`` (the subcommand is `embedjax.mine`, which sits above the
encoder in the layer order).

For each (query, positive) training pair of a BEIR folder: embed the corpus and the queries with the model,
take the ``candidates`` best-scoring documents per query, drop the query's positives (by id, and any document
whose text equals a positive's), then apply the positive-aware filter of NV-Retriever (Moreira et al., 2024,
"TopK-PercPos"): drop every candidate scoring above ``margin`` (0.95) times the positive's score, since those
are likely unlabelled positives. The best ``negatives`` remaining are written, one JSON object per pair, in
the triplet format `embedjax.data.sources.read_pairs` reads (when fewer than ``negatives`` survive in the top
``candidates``, the search goes deeper, doubling up to ``max_candidates``):

    {"query": str, "query_id": str, "positive": {"title", "text"}, "positive_id": str,
     "negatives": [{"title", "text"}, ...], "negative_ids": [str, ...], "scores": [pos, neg1, ...]}

``scores`` are the mining model's cosine similarities (usable as teacher scores). The core,
`mine_hard_negatives`, takes plain encode functions, so it is testable without a model.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embedjax.data.sources import DataError, doc_text

log = logging.getLogger(__name__)

EncodeFn = Callable[[list[str]], np.ndarray]


@dataclass
class MiningStats:
    """Counts of what mining dropped and why (nothing is dropped silently)."""

    pairs: int = 0
    written: int = 0
    candidates: int = 0  # candidates examined (ranked documents looked at until enough negatives)
    dropped_positive: int = 0  # a positive of the query (by id or identical text)
    dropped_margin: int = 0  # scored above margin x the positive's score (likely false negative)
    pairs_short: int = 0  # pairs that got fewer than the requested number of negatives
    pairs_without_negatives: int = 0  # of which got none (still written, with an empty list)
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"{self.written} triplets from {self.pairs} pairs; of {self.candidates} candidates examined, "
            f"dropped {self.dropped_positive} positives and {self.dropped_margin} above the margin; "
            f"{self.pairs_short} pairs have fewer negatives than asked "
            f"({self.pairs_without_negatives} have none)"
        )


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def mine_hard_negatives(
    queries: Mapping[str, str],
    corpus: Mapping[str, tuple[str, str]],
    qrels: Mapping[str, Mapping[str, int]],
    encode_queries: EncodeFn,
    encode_documents: EncodeFn,
    *,
    num_negatives: int = 8,
    candidates: int = 50,
    max_candidates: int = 1000,
    margin: float = 0.95,
    min_grade: int = 1,
    chunk: int = 256,
    progress: bool = True,
) -> tuple[list[dict], MiningStats]:
    """Triplets (see module docstring) for every (query, positive) in `qrels` with grade >= `min_grade`.

    `encode_*` map a list of texts to [N, D] embeddings (normalised here; scores are cosines). Documents are
    encoded as ``(title + " " + text).strip()``. A query's positives are never negatives, nor is any document
    with the same text as one of them; candidates scoring above ``margin * score(query, positive)`` are
    dropped. The top `candidates` documents are searched first; while fewer than `num_negatives` qualify the
    search goes deeper (doubling, up to `max_candidates`), as a weakly scored positive can leave the whole top
    above the margin.
    """
    if not 0 < margin <= 1:
        raise ValueError(f"margin must be in (0, 1], got {margin}")
    if num_negatives < 1 or candidates < num_negatives:
        raise ValueError(f"need 1 <= num_negatives <= candidates, got {num_negatives} and {candidates}")
    stats = MiningStats()
    pairs = [(q, d) for q, docs in qrels.items() for d, g in docs.items() if g >= min_grade]
    if not pairs:
        raise DataError("no (query, positive) pairs with grade >= %d to mine for" % min_grade)
    for q, d in pairs:
        if q not in queries:
            raise DataError(f"qrels name query {q!r}, which is not in the queries")
        if d not in corpus:
            raise DataError(f"qrels name document {d!r}, which is not in the corpus")
    stats.pairs = len(pairs)
    doc_ids = list(corpus)
    doc_texts = [doc_text(*corpus[d]) for d in doc_ids]
    row_of = {d: i for i, d in enumerate(doc_ids)}
    text_rows: dict[str, list[int]] = {}
    for i, t in enumerate(doc_texts):
        text_rows.setdefault(t, []).append(i)
    qids = list(dict.fromkeys(q for q, _ in pairs))

    t0 = time.time()
    D = _normalize(encode_documents(doc_texts))
    stats.seconds["encode_corpus"] = time.time() - t0
    t0 = time.time()
    Q = _normalize(encode_queries([queries[q] for q in qids]))
    stats.seconds["encode_queries"] = time.time() - t0
    if D.shape[0] != len(doc_ids) or Q.shape[0] != len(qids) or D.shape[1] != Q.shape[1]:
        raise ValueError(
            f"encode functions returned shapes {Q.shape} / {D.shape} for {len(qids)} queries / "
            f"{len(doc_ids)} documents"
        )

    t0 = time.time()
    out: list[dict | None] = [None] * len(pairs)
    pairs_of: dict[str, list[int]] = {}
    for n, (q, _) in enumerate(pairs):
        pairs_of.setdefault(q, []).append(n)
    starts = range(0, len(qids), chunk)
    if progress:
        from embedjax.progress import track

        starts = track(starts, "mine: search", "chunk")
    for s in starts:
        S = Q[s : s + chunk] @ D.T  # [q, N] cosine scores
        for r, q in enumerate(qids[s : s + chunk]):
            pos_rows = {row_of[p] for p, g in qrels[q].items() if g >= min_grade and p in row_of}
            for p in list(pos_rows):
                pos_rows.update(text_rows[doc_texts[p]])  # identical text = the same document
            for n in pairs_of[q]:
                d = pairs[n][1]
                pos_score = float(S[r, row_of[d]])
                negs = _select(
                    S[r], pos_rows, margin * pos_score, num_negatives, candidates, max_candidates, stats
                )
                title, text = corpus[d]
                out[n] = {
                    "query": queries[q],
                    "query_id": q,
                    "positive": {"title": title, "text": text},
                    "positive_id": d,
                    "negatives": [
                        {"title": corpus[doc_ids[c]][0], "text": corpus[doc_ids[c]][1]} for c in negs
                    ],
                    "negative_ids": [doc_ids[c] for c in negs],
                    "scores": [round(pos_score, 6)] + [round(float(S[r, c]), 6) for c in negs],
                }
    stats.written = len(out)
    stats.seconds["search"] = time.time() - t0
    return [o for o in out if o is not None], stats


def _ranked(scores: np.ndarray, depth: int) -> np.ndarray:
    """Rows of the `depth` best scores, best first (ties by row)."""
    if depth < len(scores):
        top = np.argpartition(-scores, depth - 1)[:depth]
    else:
        top = np.arange(len(scores))
    return top[np.lexsort((top, -scores[top]))]


def _select(
    scores: np.ndarray,
    pos_rows: set[int],
    limit: float,
    k: int,
    depth: int,
    max_depth: int,
    stats: MiningStats,
) -> list[int]:
    """The best `k` rows that are not positives and score <= `limit`, searching the top `depth` and doubling
    the depth (up to `max_depth`) while fewer than `k` qualify."""
    depth = min(depth, len(scores))
    max_depth = min(max(max_depth, depth), len(scores))
    seen = 0
    negs: list[int] = []
    while True:
        ranked = _ranked(scores, depth)
        for c in ranked[seen:]:
            stats.candidates += 1
            if int(c) in pos_rows:
                stats.dropped_positive += 1
            elif scores[c] > limit:
                stats.dropped_margin += 1
            else:
                negs.append(int(c))
                if len(negs) == k:
                    return negs
        seen = len(ranked)
        if depth >= max_depth:
            break
        depth = min(2 * depth, max_depth)
    stats.pairs_short += 1
    stats.pairs_without_negatives += not negs
    return negs


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """Writes rows atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path
