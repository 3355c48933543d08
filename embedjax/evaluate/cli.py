"""``embedjax eval``: evaluate a model on STS-B or a BEIR folder, write metrics JSON, print a short table.

    embedjax eval --model PATH --task stsb --data DIR [--split test]
    embedjax eval --model PATH --task beir --data DIR --split test [--query-prompt "query: "] \\
        [--document-prompt "passage: "] [--output metrics.json] [--cache-dir DIR]

Wired into the top-level CLI with ``add_parser(subparsers)``; ``run(args)`` is the subcommand (returns the
exit status), ``evaluate(args)`` does the work and returns the metrics. Values in the JSON are fractions; the table shows them x100.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from embedjax.evaluate.base import Evaluator, encode_fn_from_encoder

TASKS = ("stsb", "beir")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the ``eval`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate an embedding model on STS-B or a BEIR retrieval folder",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--model", required=True, help="model folder or hub id, loaded with embedjax.Encoder.load")
    p.add_argument("--task", required=True, choices=TASKS, help="stsb: STS Benchmark file/folder; beir: BEIR folder")
    p.add_argument("--data", required=True, help="STS-B folder ({split}.tsv) or file; BEIR folder")
    p.add_argument("--split", default="test", help="split name (default: test)")
    p.add_argument("--output", default=None, help="write metrics JSON here")
    p.add_argument("--query-prompt", default=None, help='text prompt for queries, e.g. "query: " or '
                   '"task: search result | query: {text}"')
    p.add_argument("--document-prompt", default=None, help='text prompt for documents, e.g. "passage: " or '
                   '"title: {title} | text: {text}"')
    p.add_argument("--batch-size", type=int, default=128, help="encoding batch size (default: 128)")
    p.add_argument("--max-length", type=int, default=None, help="max tokens per text (default: the model's)")
    p.add_argument("--cache-dir", default=None, help="corpus-embedding cache folder "
                   "(default: $EMBEDJAX_CACHE_DIR or ~/.cache/embedjax)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the corpus-embedding cache")
    p.add_argument("--ignore-identical-ids", action="store_true",
                   help="BEIR: drop retrieved documents whose id equals the query id")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--precision", choices=("float32", "int8", "uint8", "binary", "ubinary"), default="float32",
                   help="beir: search a quantised corpus index (int8 ranges: the model's calibration, else a "
                        "random sample of documents)")
    p.add_argument("--rescore", choices=("int8", "float32"), default=None,
                   help="beir, binary precisions: re-rank the top candidates with the float query against int8 / "
                        "float32 documents")
    p.add_argument("--rescore-multiplier", type=int, default=4, help="candidates re-ranked per result (default 4)")
    p.add_argument("--dim", type=int, default=None, help="beir: keep the first DIM dimensions (Matryoshka)")
    p.add_argument("--layers", type=int, default=None,
                   help="evaluate the sub-network of the first LAYERS encoder layers (2D Matryoshka)")
    p.set_defaults(func=run)
    return p


def load_encoder(model: str) -> Any:
    """``embedjax.Encoder.load(model)``; a separate function so tests can substitute a stand-in."""
    from embedjax import Encoder

    return Encoder.load(model)


def build_evaluator(args: argparse.Namespace) -> Evaluator:
    show = False if args.no_progress else None
    if args.task == "stsb":
        from embedjax.evaluate.sts import STSEvaluator

        return STSEvaluator.from_file(args.data, args.split, show_progress=show)
    from embedjax.evaluate.retrieval import RetrievalEvaluator

    return RetrievalEvaluator.from_beir(
        args.data,
        args.split,
        query_prompt=args.query_prompt,
        document_prompt=args.document_prompt,
        ignore_identical_ids=args.ignore_identical_ids,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        show_progress=show,
        precision=args.precision,
        rescore=args.rescore,
        rescore_multiplier=args.rescore_multiplier,
        dim=args.dim,
    )


def format_table(task: str, metrics: dict[str, float]) -> str:
    """Metric rows: fractions shown x100, counts (``n_*``) as integers."""
    rows = [(k, f"{v:.0f}" if k.startswith("n_") else f"{100 * v:.2f}") for k, v in metrics.items()]
    width = max(len(k) for k, _ in rows)
    lines = [f"{task}  (metrics x100)", "-" * (width + 10)]
    lines += [f"{k:<{width}}  {v:>8}" for k, v in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """The subcommand: runs :func:`evaluate`, returns exit status 0."""
    evaluate(args)
    return 0


def evaluate(args: argparse.Namespace) -> dict[str, float]:
    """Runs one evaluation; prints the table, writes ``--output``, returns the metrics. Bad input exits
    with status 2 and a one-line message naming the file (and line)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.task == "stsb" and (args.query_prompt or args.document_prompt):
        print("embedjax eval: --query-prompt/--document-prompt apply to --task beir only", file=sys.stderr)
        raise SystemExit(2)
    if args.task == "stsb" and (getattr(args, "precision", "float32") != "float32" or getattr(args, "rescore", None)
                                or getattr(args, "dim", None)):
        print("embedjax eval: --precision/--rescore/--dim apply to --task beir only", file=sys.stderr)
        raise SystemExit(2)
    try:
        evaluator = build_evaluator(args)
    except (OSError, ValueError) as e:  # missing files, malformed lines: the message names file and line
        print(f"embedjax eval: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    encoder = load_encoder(args.model)
    if getattr(args, "layers", None) is not None:
        try:
            encoder = encoder.truncated(args.layers)
        except ValueError as e:
            print(f"embedjax eval: --layers {args.layers}: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    ranges = getattr(encoder, "quantization_ranges", {}) or {}
    if getattr(evaluator, "precision", "float32") != "float32" or getattr(evaluator, "rescore", None):
        evaluator.ranges = ranges.get(args.dim or getattr(encoder, "dim", 0))   # the model's calibration, if any
    # Text prompts are applied by the retrieval evaluator (so they enter the cache key), not the encoder.
    encode_fn = encode_fn_from_encoder(encoder, batch_size=args.batch_size, max_length=args.max_length)
    t0 = time.perf_counter()
    metrics = evaluator.run(encode_fn)
    seconds = time.perf_counter() - t0
    print(format_table(evaluator.name, metrics))
    info = getattr(evaluator, "last_info", {}) or {}
    if "cache_hit" in info:
        print(f"corpus embeddings: {'read from cache' if info['cache_hit'] else 'encoded'} "
              f"({info.get('cache_path') or 'cache off'})")
    if "index_bytes_per_doc" in info:
        extra = (f" + {info['rescore_bytes_per_doc']} for rescoring ({info['rescore']})"
                 if info.get("rescore_bytes_per_doc") else "")
        print(f"index: {info.get('precision', 'float32')}, {info['index_bytes_per_doc']} bytes per document{extra}"
              + (f"; int8 ranges: {info['calibration']}" if info.get("calibration") else ""))
    print(f"{seconds:.1f} s")
    if args.output:
        out = {
            "task": args.task,
            "name": evaluator.name,
            "model": args.model,
            "split": args.split,
            "data": str(args.data),
            "query_prompt": args.query_prompt,
            "document_prompt": args.document_prompt,
            "max_length": args.max_length,
            "precision": getattr(args, "precision", "float32"),
            "rescore": getattr(args, "rescore", None),
            "dim": getattr(args, "dim", None),
            "index_bytes_per_doc": info.get("index_bytes_per_doc"),
            "main_metric": evaluator.main_metric,
            "metrics": metrics,
            "seconds": seconds,
        }
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> None:
    """Standalone entry (``python -m embedjax.evaluate.cli eval ...``) until the top-level CLI wires it in."""
    parser = argparse.ArgumentParser(prog="embedjax")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
