"""Runs the benchmarks that measure a peer in the same run, each in its own process one after the other, and
prints README's two benchmark tables from the JSON lines they append to bench/results.jsonl, with date, machine,
load and versions:

* throughput against sentence-transformers through `_harness.compare` (encoding and training, short and long
  texts);
* real peers through `_harness.measure` and `compare`, one row each: retrieval memory (faiss-cpu, sentence-
  transformers' semantic_search), serving (SavedModel and JAX vs sentence-transformers on onnxruntime),
  gradient-caching memory (sentence-transformers' CachedMNRL / MNRL), input-pipeline headroom (the train
  step's consumption) and greedy generation with a decoder LLM (transformers' PyTorch `generate`; default threads
  and one thread each).

    python bench/run_all.py            # ~27 minutes on a 2-core machine; run it with nothing else running

Sharded loading and the AOT rows are not run here (their peers are listed in README); run them one by one.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = [
    ("encode_vs_st.py", []),
    ("train_vs_st.py", []),
    ("train_vs_st.py", ["--long"]),
    ("encode_vs_st.py", ["--long"]),
    ("retrieval_memory.py", []),
    ("serving.py", []),
    ("gradcache_memory.py", []),
    ("input_pipeline.py", []),
    ("generate.py", []),
    ("generate.py", ["--threads", "1"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tables-only", action="store_true",
                    help="run nothing: print the tables from bench/results.jsonl (the latest line of each "
                         "benchmark), e.g. after running one benchmark alone")
    args = ap.parse_args()
    start = time.time()
    sys.path.insert(0, str(HERE))
    from _harness import RESULTS as results
    if args.tables_only:
        rows = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()]
        print(tables(rows, latest=True))
        return
    before = results.read_text(encoding="utf-8").count("\n") if results.is_file() else 0
    failed = []
    for script, extra in RUNS:
        cmd = [sys.executable, str(HERE / script), *extra]
        print("$", " ".join(cmd[1:]), file=sys.stderr, flush=True)
        if subprocess.run(cmd, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")).returncode:
            failed.append(" ".join([script, *extra]))
    rows = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()[before:]]
    print(tables(rows, seconds=time.time() - start))
    if failed:
        print(f"\nFAILED (exit status != 0; their rows say why): {', '.join(failed)}")
        sys.exit(1)


def tables(rows: list[dict], *, seconds: float | None = None, latest: bool = False) -> str:
    """README's two tables: throughput against sentence-transformers, and real peers (lines with a `row`).
    With `latest`, only the last line of each benchmark (throughput) / each command (peers) counts."""
    throughput = [r for r in rows if "row" not in r and set(r.get("sides", {})) == {"embedjax", "sentence-transformers"}]
    peers = [r for r in rows if "row" in r]
    if latest:
        throughput = list({r["benchmark"]: r for r in throughput}.values())
        peers = list({r["row"]["command"]: r for r in peers}.values())
    out = []
    if throughput:
        m, v = throughput[0]["machine"], throughput[0]["versions"]
        took = f"; {seconds:.0f} s in all" if seconds is not None else ""
        out += [f"{throughput[0]['date'][:10]}, {m['cpu']} ({m['cores']} cores), jax {v['jax']}, torch {v.get('torch')}, "
                f"sentence-transformers {v.get('sentence_transformers')}{took}",
                "| benchmark | embedjax | sentence-transformers (same process) | ratio | rounds, spread | load before -> after; other processes' CPU |",
                "|---|---|---|---|---|---|"]
        for r in throughput:
            a, b = r["sides"]["embedjax"], r["sides"]["sentence-transformers"]
            out.append(f"| {r['benchmark']} | {a['rate']:.1f} {r['unit']} | {b['rate']:.1f} {r['unit']} | "
                       f"**{r['ratio']['value']:.2f}x** | {r['rounds']} interleaved, {100 * a['spread']:.0f}% / "
                       f"{100 * b['spread']:.0f}% | {_load(r)} |")
    if peers:
        if out:
            out.append("")
        out.append(peer_table(peers))
    return "\n".join(out)


def _load(r: dict) -> str:
    """'1.84 -> 1.99; 0.8%': the 1-minute load average (this benchmark's own work included) and the share of
    the CPU other processes used while it ran (what flags a run taken under load)."""
    other = r.get("other_cpu")
    return (f"{r['load_before']} -> {r['load_after']}; " + ("unknown" if other is None else f"{100 * other:.1f}%")
            + (" (under load)" if r["under_load"] else ""))


def peer_table(rows: list[dict]) -> str:
    """README's table of real peers from result lines that carry a `row`."""
    v: dict = {}
    for r in rows:
        v.update(r.get("versions", {}))
    m = rows[0]["machine"]
    out = [f"{m['cpu']} ({m['cores']} cores), jax {v.get('jax')}, torch {v.get('torch')}, sentence-transformers "
           f"{v.get('sentence_transformers')}, faiss {v.get('faiss', '-')}, onnxruntime {v.get('onnxruntime', '-')}, tensorflow "
           f"{v.get('tensorflow', '-')}",
           "| benchmark | command | embedjax | peers (same run) | check | rounds | load before -> after; other processes' CPU |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["row"]
        out.append(f"| {c['benchmark']} | {c['command']} | {c['embedjax']} | {c['peers']} | {c['check']} | "
                   f"{r['rounds']} interleaved, {r['date'][:10]} | {_load(r)} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
