"""`embedjax mine --model PATH --data DIR --output FILE`: hard negatives for a BEIR folder's training pairs,
mined with an `embedjax.Encoder` by `embedjax.data.mining.mine_hard_negatives` (see its module for the filters
and the output format)."""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from embedjax.data.mining import mine_hard_negatives, write_jsonl
from embedjax.data.sources import read_beir

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "mine",
        help="mine hard negatives for a BEIR folder's training pairs (writes triplets JSONL)",
        description=(
            "Embed a BEIR folder's corpus and queries, take the top candidates per query, drop the query's "
            "positives and, positive-aware (NV-Retriever), every candidate scoring above MARGIN x the "
            "positive's score; write (query, positive, negatives, scores) triplets as JSON lines that "
            "embedjax.data.sources.read_pairs reads."
        ),
    )
    p.add_argument("--model", required=True, help="model folder or hub id (loaded with embedjax.Encoder)")
    p.add_argument("--data", required=True, help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv)")
    p.add_argument("--output", required=True, help="output .jsonl of triplets")
    p.add_argument("--split", default="train", help="qrels split to mine for (default: train)")
    p.add_argument("--negatives", type=int, default=8, help="negatives per pair (default: 8)")
    p.add_argument(
        "--candidates", type=int, default=50, help="top-k documents searched first per query (default: 50)"
    )
    p.add_argument(
        "--max-candidates",
        type=int,
        default=1000,
        help="search deeper, up to this rank, while fewer than --negatives qualify (default: 1000)",
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
    from embedjax.encoder import Encoder

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
        max_candidates=args.max_candidates,
        margin=args.margin,
    )
    write_jsonl(rows, out)
    secs = ", ".join(f"{k} {v:.1f}s" for k, v in stats.seconds.items())
    print(f"mined {out}: {stats.summary()} ({secs})")
    return 0
