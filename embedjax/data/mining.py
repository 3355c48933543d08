"""Hard-negative mining: ``embedjax mine --model PATH --data DIR --output FILE``.

For each (query, positive) training pair of a BEIR folder: embed the corpus and the queries with the model,
take the ``candidates`` best-scoring documents per query, drop the query's positives (by id, and any document
whose text equals a positive's), then apply the positive-aware filter of NV-Retriever (Moreira et al., 2024,
"TopK-PercPos"): drop every candidate scoring above ``margin`` (0.95) times the positive's score, since those
are likely unlabelled positives. The best ``negatives`` remaining are written, one JSON object per pair, in
the triplet format `embedjax.data.sources.read_pairs` reads:

    {"query": str, "query_id": str, "positive": {"title", "text"}, "positive_id": str,
     "negatives": [{"title", "text"}, ...], "negative_ids": [str, ...], "scores": [pos, neg1, ...]}

``scores`` are the mining model's cosine similarities (usable as teacher scores). The core,
`mine_hard_negatives`, takes plain encode functions, so it is testable without a model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from embedjax.data.sources import DataError, doc_text, read_beir

log = logging.getLogger(__name__)

EncodeFn = Callable[[list[str]], np.ndarray]


@dataclass
class MiningStats:
    """Counts of what mining dropped and why (nothing is dropped silently)."""

    pairs: int = 0
    written: int = 0
    candidates: int = 0
    dropped_positive: int = 0  # a positive of the query (by id or identical text)
    dropped_margin: int = 0  # scored above margin x the positive's score (likely false negative)
    pairs_short: int = 0  # pairs that got fewer than the requested number of negatives
    pairs_without_negatives: int = 0  # of which got none (still written, with an empty list)
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"{self.written} triplets from {self.pairs} pairs; of {self.candidates} candidates dropped "
            f"{self.dropped_positive} positives and {self.dropped_margin} above the margin; "
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
    margin: float = 0.95,
    min_grade: int = 1,
    chunk: int = 256,
    progress: bool = True,
) -> tuple[list[dict], MiningStats]:
    """Triplets (see module docstring) for every (query, positive) in `qrels` with grade >= `min_grade`.

    `encode_*` map a list of texts to [N, D] embeddings (normalised here; scores are cosines). Documents are
    encoded as ``(title + " " + text).strip()``. A query's positives are never negatives, nor is any document
    with the same text as one of them; candidates scoring above ``margin * score(query, positive)`` are
    dropped.
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
    k = min(candidates, len(doc_ids))
    by_query: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    rng = range(0, len(qids), chunk)
    if progress:
        from tqdm.auto import tqdm

        rng = tqdm(rng, desc="mine: search", unit="chunk")
    for s in rng:
        S = Q[s : s + chunk] @ D.T  # [q, N]
        top = (
            np.argpartition(-S, k - 1, axis=1)[:, :k]
            if k < S.shape[1]
            else np.tile(np.arange(S.shape[1]), (S.shape[0], 1))
        )
        for r, q in enumerate(qids[s : s + chunk]):
            cand = top[r][np.lexsort((top[r], -S[r, top[r]]))]  # by score desc, ties by row
            by_query[q] = (cand, S[r])

    out: list[dict] = []
    for q, d in pairs:
        cand, scores = by_query[q]
        pos_rows = {row_of[p] for p, g in qrels[q].items() if g >= min_grade and p in row_of}
        for p in list(pos_rows):
            pos_rows.update(text_rows[doc_texts[p]])  # identical text = the same document
        pos_score = float(scores[row_of[d]])
        limit = margin * pos_score
        negs: list[int] = []
        for c in cand:
            stats.candidates += 1
            if int(c) in pos_rows:
                stats.dropped_positive += 1
                continue
            if scores[c] > limit:
                stats.dropped_margin += 1
                continue
            if len(negs) < num_negatives:
                negs.append(int(c))
        if len(negs) < num_negatives:
            stats.pairs_short += 1
            stats.pairs_without_negatives += not negs
        title, text = corpus[d]
        out.append(
            {
                "query": queries[q],
                "query_id": q,
                "positive": {"title": title, "text": text},
                "positive_id": d,
                "negatives": [{"title": corpus[doc_ids[c]][0], "text": corpus[doc_ids[c]][1]} for c in negs],
                "negative_ids": [doc_ids[c] for c in negs],
                "scores": [round(pos_score, 6)] + [round(float(scores[c]), 6) for c in negs],
            }
        )
    stats.written = len(out)
    stats.seconds["search"] = time.time() - t0
    return out, stats


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


# ------------------------------------------------------------------------------------------------------ CLI
def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "mine",
        help="mine hard negatives for a BEIR folder's training pairs (writes triplets JSONL)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--model", required=True, help="model folder or hub id (loaded with embedjax.Encoder)")
    p.add_argument("--data", required=True, help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv)")
    p.add_argument("--output", required=True, help="output .jsonl of triplets")
    p.add_argument("--split", default="train", help="qrels split to mine for (default: train)")
    p.add_argument("--negatives", type=int, default=8, help="negatives per pair (default: 8)")
    p.add_argument(
        "--candidates", type=int, default=50, help="top-k documents considered per query (default: 50)"
    )
    p.add_argument(
        "--margin",
        type=float,
        default=0.95,
        help="drop candidates scoring above MARGIN x the positive's score (default: 0.95)",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-length", type=int, default=None, help="token limit (default: the model's)")
    p.add_argument("--query-prompt", default=None, help="string prepended to queries, e.g. 'query: '")
    p.add_argument("--document-prompt", default=None, help="string prepended to documents, e.g. 'passage: '")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.suffix != ".jsonl":
        raise ValueError(f"--output {out}: expected a .jsonl file")
    beir = read_beir(args.data, (args.split,))
    from embedjax import Encoder

    t0 = time.time()
    enc = Encoder.load(args.model)
    log.info("loaded %r in %.1fs", enc, time.time() - t0)

    def encode(texts: list[str], tower: str, prompt: str | None) -> np.ndarray:
        return enc.encode(
            texts,
            batch_size=args.batch_size,
            max_length=args.max_length,
            prompt=prompt,
            normalize=True,
            tower=tower,
            show_progress=len(texts) > 256,
        )

    rows, stats = mine_hard_negatives(
        beir.queries,
        beir.corpus,
        beir.qrels[args.split],
        lambda t: encode(t, "query", args.query_prompt),
        lambda t: encode(t, "document", args.document_prompt),
        num_negatives=args.negatives,
        candidates=args.candidates,
        margin=args.margin,
    )
    write_jsonl(rows, out)
    secs = ", ".join(f"{k} {v:.1f}s" for k, v in stats.seconds.items())
    print(f"mined {out}: {stats.summary()} ({secs})")
    return 0
