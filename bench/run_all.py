"""Runs the benchmarks that have a peer in the same process (encoding and training vs sentence-transformers, short
and long texts) through `_harness.compare`, each in its own process one after the other, and prints README's
comparison table from the JSON lines they append to bench/results.jsonl, with date, machine, load and versions.

    python bench/run_all.py            # ~10 minutes on a 2-core machine; run it with nothing else running

The other benchmarks (retrieval memory, serving, gradient-caching memory, input pipeline, sharded loading, AOT)
have no peer that runs here and are listed in README with that reason; run them one by one.
"""
from __future__ import annotations

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
]


def main() -> None:
    start = time.time()
    results = HERE / "results.jsonl"
    before = results.read_text(encoding="utf-8").count("\n") if results.is_file() else 0
    for script, args in RUNS:
        cmd = [sys.executable, str(HERE / script), *args]
        print("$", " ".join(cmd[1:]), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    rows = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()[before:]]
    m, v = rows[0]["machine"], rows[0]["versions"]
    print(f"\n{rows[0]['date'][:10]}, {m['cpu']} ({m['cores']} cores), jax {v['jax']}, torch {v.get('torch')}, "
          f"sentence-transformers {v.get('sentence_transformers')}; {time.time() - start:.0f} s in all")
    print("| benchmark | embedjax | sentence-transformers (same process) | ratio | rounds, spread | load before -> after |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        a, b = r["sides"]["embedjax"], r["sides"]["sentence-transformers"]
        flag = " (under load)" if r["under_load"] else ""
        print(f"| {r['benchmark']} | {a['rate']:.1f} {r['unit']} | {b['rate']:.1f} {r['unit']} | "
              f"**{r['ratio']['value']:.2f}x** | {r['rounds']} interleaved, {100 * a['spread']:.0f}% / "
              f"{100 * b['spread']:.0f}% | {r['load_before']} -> {r['load_after']}{flag} |")


if __name__ == "__main__":
    main()
