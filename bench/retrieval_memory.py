"""Retrieval evaluation memory and time as the corpus grows: embedjax's streamed search vs faiss-cpu
`IndexFlatIP` and sentence-transformers' chunked `util.semantic_search`, same embeddings, same top-k, same run.

    python bench/retrieval_memory.py [--sizes 5000 50000] [--queries 500] [--dim 768] [--rounds 5]

Every (corpus size, side) runs in a fresh subprocess, so peaks do not mix, and the sides of a size run in
interleaved rounds (`_harness.measure`). Each side does the same work: embed the corpus and the queries with
the same fake encoder, find the exact top-100 documents of every query by dot product of L2-normalised
embeddings, score nDCG@10 with `retrieval_metrics`. The fake encoder (no model; only search memory is
measured) is deterministic: component j of text i is a hash of (i, j), so every side sees the same vectors,
asked for in pieces of 512 texts; query i is document rel(i)'s vector plus 6x as much noise. Sides:

* ``embedjax``: ``RetrievalEvaluator.search`` (corpus embedded 4096 documents at a time, scored in blocks,
  a running top-k; no cache);
* ``faiss``: ``faiss.IndexFlatIP``, ``add`` chunk by chunk as the corpus is embedded, then ``search(q, 100)``;
* ``sentence-transformers``: the corpus embeddings filled into one ``[N, D]`` torch tensor as they are
  embedded, then ``util.semantic_search(q, corpus, top_k=100, score_function=dot_score)`` with its default
  chunks (100 queries x 500k documents; ``dot_score`` because the vectors are normalised, as its docs advise);
* ``numpy-full`` (only with ``--sides``): the whole corpus matrix, one ``[Q, N]`` score matrix, argsort.

Printed per side and size: RSS before the evaluation (interpreter, imports, corpus ids and texts, a warm-up
search), the evaluation's growth (peak RSS, VmHWM, minus that), seconds in all and seconds outside
the encoder (search + ranking), nDCG@10, as median [min - max] of the rounds. Then the check: every side's
top-100 lists against embedjax's (identical lists / identical sets; where two lists differ, their scores at
each rank, recomputed in float64, must agree within 1e-5: the lists differ only in the order of float32
near-ties), and equal nDCG@10.
Exits 1 if the check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

K = 100
PIECE = 512           # texts per encode call, on every side (RetrievalEvaluator's encode_piece_size)
CHUNK = 4096          # documents per corpus chunk: embedjax's corpus_chunk_size, the peers' add / fill step
NOISE = 6.0
SIDES = ("embedjax", "faiss", "sentence-transformers")
TIE_TOL = 1e-5


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    """This process's peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux carries that across exec, so a child
    started by a big parent would report the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def hash_vectors(ids: np.ndarray, salt: int, dim: int) -> np.ndarray:
    """[len(ids), dim] float32, component j of row i = splitmix64(salt, i, j) as a uniform in [-0.5, 0.5)."""
    with np.errstate(over="ignore"):
        z = (ids.astype(np.uint64)[:, None] * np.uint64(dim) + np.arange(dim, dtype=np.uint64)[None, :]
             + np.uint64(salt) * np.uint64(0xD1B54A32D192ED03) + np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return ((z >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24) - np.float32(0.5))


def relevant(n_docs: int, n_queries: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, n_docs, size=n_queries)


def make_encoder(n_docs: int, n_queries: int, dim: int):
    """The fake model: document / query texts -> the same vectors on every side (see module docstring)."""
    rel = relevant(n_docs, n_queries)
    spent = [0.0]

    def encode_fn(texts, role):
        t0 = time.perf_counter()
        ids = np.fromiter((int(t.rsplit(" ", 1)[1]) for t in texts), dtype=np.int64, count=len(texts))
        if role == "document":
            out = hash_vectors(ids, 0, dim)
        else:
            out = hash_vectors(rel[ids], 0, dim) + np.float32(NOISE) * hash_vectors(ids, 1, dim)
        spent[0] += time.perf_counter() - t0
        return out

    encode_fn.cache_key = f"bench-hash-{dim}"
    return encode_fn, spent


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _embed_in_pieces(encode_fn, texts, role, start=0):
    for s in range(start, len(texts), PIECE):
        yield s, _normalize(encode_fn(texts[s: s + PIECE], role))


def child(n_docs: int, n_queries: int, dim: int, side: str, out_npy: str) -> dict:
    from embedjax.evaluate.retrieval import BeirData, RetrievalEvaluator, retrieval_metrics

    doc_texts = [f"synthetic document number {i}" for i in range(n_docs)]
    q_texts = [f"synthetic query {i}" for i in range(n_queries)]
    rel = relevant(n_docs, n_queries)
    qids = [f"q{i}" for i in range(n_queries)]
    qrels = {f"q{i}": {f"doc{int(rel[i])}": 1} for i in range(n_queries)}
    encode_fn, spent = make_encoder(n_docs, n_queries, dim)

    # Warm up each side's library (BLAS / OpenMP / torch thread pools, first-call allocations) on a small
    # problem, so that the baseline includes them.
    small = _normalize(hash_vectors(np.arange(256), 2, dim))
    if side == "embedjax":
        data = BeirData.from_dicts({f"doc{i}": t for i, t in enumerate(doc_texts)}, dict(zip(qids, q_texts)), qrels)
        ev = RetrievalEvaluator(data, k_values=(10, K), use_cache=False, show_progress=False)
        _ = small @ small.T
    elif side == "faiss":
        import faiss
        ix = faiss.IndexFlatIP(dim)
        ix.add(small)
        ix.search(small, 10)
        del ix
    elif side == "sentence-transformers":
        import torch
        from sentence_transformers import util
        util.semantic_search(torch.from_numpy(small), torch.from_numpy(small), top_k=10,
                             score_function=util.dot_score)
    else:
        _ = np.argsort(-(small @ small.T), axis=1)
    del small

    before = _rss_mib()
    t0 = time.perf_counter()
    if side == "embedjax":
        res = ev.search(encode_fn, k=K)
        ranked = dict(zip(res.query_ids, res.doc_ids))
        top = np.array([[int(d[3:]) for d in res.doc_ids[i]] for i in range(n_queries)], np.int64)
    else:
        q = np.concatenate([e for _, e in _embed_in_pieces(encode_fn, q_texts, "query")])
        if side == "faiss":
            ix = faiss.IndexFlatIP(dim)
            for _, e in _embed_in_pieces(encode_fn, doc_texts, "document"):
                ix.add(e)
            _, top = ix.search(q, K)
        elif side == "sentence-transformers":
            corpus = torch.empty((n_docs, dim), dtype=torch.float32)
            for s, e in _embed_in_pieces(encode_fn, doc_texts, "document"):
                corpus[s: s + len(e)] = torch.from_numpy(e)
            hits = util.semantic_search(torch.from_numpy(q), corpus, top_k=K, score_function=util.dot_score)
            top = np.array([[h["corpus_id"] for h in row] for row in hits], np.int64)
        else:
            d = np.concatenate([e for _, e in _embed_in_pieces(encode_fn, doc_texts, "document")])
            top = np.argsort(-(q @ d.T), axis=1, kind="stable")[:, :K]
        ranked = {qid: [f"doc{j}" for j in top[i]] for i, qid in enumerate(qids)}
    metrics, _ = retrieval_metrics(ranked, qrels, (10, K))
    seconds = time.perf_counter() - t0
    peak = _peak_mib()
    if out_npy:
        np.save(out_npy, np.asarray(top, np.int64))
    return {"rss_before_mib": before, "eval_mib": peak - before, "peak_mib": peak, "seconds": seconds,
            "search_seconds": seconds - spent[0], "ndcg@10": metrics["ndcg@10"]}


def check(tops: dict[str, np.ndarray], n_docs: int, n_queries: int, dim: int) -> dict:
    """Each side's top-K lists against embedjax's: how many are identical, how many hold the same set, and for
    the queries whose lists differ, the largest difference between the two lists' scores at the same rank,
    recomputed in float64 (a float32 near-tie when <= TIE_TOL)."""
    ref = tops["embedjax"]
    rel = relevant(n_docs, n_queries)
    out = {}
    for side, top in tops.items():
        if side == "embedjax":
            continue
        differ = np.nonzero((top != ref).any(axis=1))[0]
        same_set = n_queries - sum(set(top[i].tolist()) != set(ref[i].tolist()) for i in differ)
        worst = 0.0
        for i in differ:
            q = (hash_vectors(rel[i: i + 1], 0, dim) + np.float32(NOISE) * hash_vectors(np.array([i]), 1, dim)
                 ).astype(np.float64)[0]
            s = []
            for ids in (top[i], ref[i]):
                d = hash_vectors(ids, 0, dim).astype(np.float64)
                s.append((d / np.linalg.norm(d, axis=1, keepdims=True)) @ (q / np.linalg.norm(q)))
            worst = max(worst, float(np.abs(s[0] - s[1]).max()))
        out[side] = {"same_list": n_queries - len(differ), "same_set": int(same_set),
                     "max_score_difference_at_rank": worst, "ok": worst <= TIE_TOL}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=[*SIDES, "numpy-full"])
    p.add_argument("--child", nargs=3, metavar=("N_DOCS", "SIDE", "OUT_NPY"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        n, side, out_npy = args.child
        print(json.dumps(child(int(n), args.queries, args.dim, side, out_npy)))
        return 0
    if args.sides[0] != "embedjax":
        p.error("the first side must be embedjax (the others are checked against it)")

    from _harness import combined_load, measure, record, report_measure

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               TF_CPP_MIN_LOG_LEVEL="2")
    results, checks = {}, {}
    ok = True
    with tempfile.TemporaryDirectory(prefix="embedjax-bench-retrieval-") as tmp:
        for n in args.sizes:
            first: dict[str, bool] = {}

            def run(side, n=n, first=first):
                out = os.path.join(tmp, f"{side}-{n}.npy") if side not in first else ""
                first[side] = True
                cmd = [sys.executable, __file__, "--queries", str(args.queries), "--dim", str(args.dim),
                       "--child", str(n), side, out]
                r = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if r.returncode:
                    raise RuntimeError(f"{side} at {n} docs failed:\n{r.stderr[-3000:]}")
                return json.loads(r.stdout.strip().splitlines()[-1])

            res = measure(f"retrieval: {n} docs x {args.queries} queries, dim {args.dim}, top-{K}",
                          {s: (lambda s=s: run(s)) for s in args.sides}, rounds=args.rounds, write=False,
                          modules=("faiss", "torch", "sentence_transformers"),
                          meta={"n_docs": n, "queries": args.queries, "dim": args.dim, "k": K})
            tops = {s: np.load(os.path.join(tmp, f"{s}-{n}.npy")) for s in args.sides}
            checks[n] = check(tops, n, args.queries, args.dim)
            ndcg = {s: v["ndcg@10"]["median"] for s, v in res["sides"].items()}
            for s, c in checks[n].items():
                c["same_ndcg@10"] = abs(ndcg[s] - ndcg["embedjax"]) < 1e-9
                ok &= c["ok"] and c["same_ndcg@10"]
            res["check"] = checks[n]
            results[n] = res
            print(report_measure(res), flush=True)
            for s, c in checks[n].items():
                print(f"  check {s} vs embedjax: same top-{K} list for {c['same_list']}/{args.queries} queries, "
                      f"same set for {c['same_set']}; where they differ, largest float64 score difference at the "
                      f"same rank {c['max_score_difference_at_rank']:.1e} ({'near-ties' if c['ok'] else 'NOT TIES'});"
                      f" nDCG@10 {'equal' if c['same_ndcg@10'] else 'DIFFERS'}", flush=True)

    lo, hi = min(args.sizes), max(args.sizes)
    mem = {s: (results[lo]["sides"][s]["eval_mib"]["median"], results[hi]["sides"][s]["eval_mib"]["median"])
           for s in args.sides}
    sec = {s: results[hi]["sides"][s]["search_seconds"]["median"] for s in args.sides}
    print(f"\nevaluation memory (peak RSS growth), {lo} -> {hi} docs (x{hi / lo:.0f} corpus); "
          f"seconds outside the encoder at {hi}:")
    for s in args.sides:
        a, b = mem[s]
        print(f"  {s:>22}: +{a:6.1f} -> +{b:6.1f} MiB (x{b / a:.2f}), {sec[s]:.2f} s")
    peers = [s for s in args.sides if s != "embedjax"]
    a, b = mem["embedjax"]
    row = {
        "benchmark": f"retrieval eval, {lo // 1000}k -> {hi // 1000}k synthetic docs, {args.queries} queries, "
                     f"dim {args.dim}, top-{K}",
        "command": "`python bench/retrieval_memory.py`",
        "embedjax": f"streamed search: peak RSS +{a:.0f} -> +{b:.0f} MiB (x{b / a:.2f}); {sec['embedjax']:.2f} s",
        "peers": "; ".join(f"{s}: +{mem[s][0]:.0f} -> +{mem[s][1]:.0f} MiB (x{mem[s][1] / mem[s][0]:.2f}); "
                           f"{sec[s]:.2f} s" for s in peers),
        "check": ("same top-100 ids (lists differ only in the order of float32 near-ties), same nDCG@10"
                  if ok else "RESULTS DIFFER") + "; identical lists at "
                 + ", ".join(f"{n // 1000}k: " + " / ".join(f"{checks[n][s]['same_list']}" for s in peers)
                             for n in args.sizes) + f" of {args.queries} ({' / '.join(peers)})",
    }
    summary = {"benchmark": row["benchmark"], "date": results[hi]["date"], "row": row,
               "rounds": args.rounds, "machine": results[hi]["machine"], "versions": results[hi]["versions"],
               **combined_load(*results.values()), "sizes": {str(n): r for n, r in results.items()}}
    record(summary)
    print("PASS: results agree" if ok else "FAIL: results differ")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
