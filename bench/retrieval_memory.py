"""Peak memory of retrieval evaluation as the corpus grows: embedjax's streamed search vs a naive peer.

    python bench/retrieval_memory.py [--sizes 5000 50000] [--queries 1000] [--dim 768]

Each (size, mode) runs in its own subprocess so peaks do not mix. Embeddings come from a fake encode_fn
(random float32), so only the evaluator's memory is measured, not a model's. Modes:

* ``naive``: the usual notebook approach, the peer: embed the whole corpus, one ``[Q, N]`` score matrix,
  argsort per query.
* ``embedjax``: ``RetrievalEvaluator.run`` (corpus embedded in chunks, running top-k), writing the cache.
* ``embedjax-cached``: the same evaluation reading the corpus embeddings back from that cache.

Printed per run: RSS before the evaluation (Python, numpy, the corpus ids/texts and qrels), peak RSS, and
the evaluation's own growth (peak - before), and the peak of memory allocated during the evaluation as
tracemalloc sees it (Python objects and numpy buffers; RSS can exceed it by what the C allocator keeps
after frees); then the 50k / 5k ratios per mode. Streamed search should stay near 1x while the naive peer
grows with the corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(n_docs: int, n_queries: int, dim: int, mode: str, cache_dir: str) -> dict:
    import numpy as np

    from embedjax.evaluate.retrieval import BeirData, RetrievalEvaluator, retrieval_metrics

    rng = np.random.default_rng(0)
    corpus = {f"doc{i}": f"synthetic document number {i}" for i in range(n_docs)}
    queries = {f"q{i}": f"synthetic query {i}" for i in range(n_queries)}
    rel = rng.integers(0, n_docs, size=n_queries)
    qrels = {f"q{i}": {f"doc{int(rel[i])}": 1} for i in range(n_queries)}
    data = BeirData.from_dicts(corpus, queries, qrels)
    del corpus

    emb_rng = np.random.default_rng(1)

    def encode_fn(texts, role):
        return emb_rng.standard_normal((len(texts), dim), dtype=np.float32)

    encode_fn.cache_key = f"bench-random-{dim}"
    # Warm up numpy's BLAS and allocator with a small problem so the baseline includes them.
    _ = encode_fn(["x"] * 64, "query") @ encode_fn(["x"] * 64, "document").T
    before = _rss_mib()
    tracemalloc.start()  # numpy reports its buffers to tracemalloc too
    t0 = time.perf_counter()
    if mode == "naive":
        texts = [(t + " " + x).strip() for t, x in zip(data.doc_titles, data.doc_texts)]
        d_NxD = encode_fn(texts, "document")
        d_NxD /= np.linalg.norm(d_NxD, axis=1, keepdims=True)
        qids = list(qrels)
        q_QxD = encode_fn([data.queries[q] for q in qids], "query")
        q_QxD /= np.linalg.norm(q_QxD, axis=1, keepdims=True)
        scores_QxN = q_QxD @ d_NxD.T
        top_QxK = np.argsort(-scores_QxN, axis=1, kind="stable")[:, :100]
        ranked = {q: [data.doc_ids[j] for j in top_QxK[i]] for i, q in enumerate(qids)}
        metrics, _ = retrieval_metrics(ranked, qrels, (10, 100))
        cache_hit = None
    else:
        ev = RetrievalEvaluator(data, cache_dir=cache_dir, show_progress=False)
        metrics = ev.run(encode_fn)
        cache_hit = ev.last_info.get("cache_hit")
    seconds = time.perf_counter() - t0
    traced_peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    peak = _peak_mib()
    return {"n_docs": n_docs, "mode": mode, "rss_before_mib": before, "peak_mib": peak,
            "eval_mib": peak - before, "traced_mib": traced_peak, "seconds": seconds, "ndcg@10": metrics["ndcg@10"], "cache_hit": cache_hit}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--modes", nargs="+", default=["naive", "embedjax", "embedjax-cached"])
    p.add_argument("--child", nargs=3, metavar=("N_DOCS", "MODE", "CACHE_DIR"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        n, mode, cache_dir = args.child
        print(json.dumps(child(int(n), args.queries, args.dim, mode, cache_dir)))
        return

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    rows = []
    with tempfile.TemporaryDirectory(prefix="embedjax-bench-cache-") as cache_dir:
        for n in args.sizes:
            for mode in args.modes:  # "embedjax" writes the cache that "embedjax-cached" then reads
                cmd = [sys.executable, __file__, "--queries", str(args.queries), "--dim", str(args.dim),
                       "--child", str(n), mode, cache_dir]
                out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
                row = json.loads(out.strip().splitlines()[-1])
                if mode == "embedjax-cached" and not row["cache_hit"]:
                    raise RuntimeError("the cached run did not read the cache")
                rows.append(row)
                print(f"{mode:>16} {n:>7} docs x {args.queries} queries, dim {args.dim}: "
                      f"before {row['rss_before_mib']:7.1f} MiB  peak {row['peak_mib']:7.1f} MiB  "
                      f"evaluation +{row['eval_mib']:7.1f} MiB (allocated {row['traced_mib']:6.1f})  {row['seconds']:6.1f} s", flush=True)
    lo, hi = min(args.sizes), max(args.sizes)
    print(f"\ngrowth of evaluation memory, {hi} / {lo} docs (x{hi / lo:.0f} corpus):")
    for mode in args.modes:
        a = next(r for r in rows if r["mode"] == mode and r["n_docs"] == lo)
        b = next(r for r in rows if r["mode"] == mode and r["n_docs"] == hi)
        print(f"{mode:>16}: {b['eval_mib']:7.1f} / {a['eval_mib']:6.1f} MiB = x{b['eval_mib'] / a['eval_mib']:.2f}"
              f"   (peak RSS x{b['peak_mib'] / a['peak_mib']:.2f}, "
              f"allocated {b['traced_mib']:.1f} / {a['traced_mib']:.1f} MiB = x{b['traced_mib'] / a['traced_mib']:.2f})")


if __name__ == "__main__":
    main()
