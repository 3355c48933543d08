"""Per-chip memory and compile time of one training step for a target TPU topology, with rematerialisation and
scanned layers off and on (`remat_policy`, `scan_layers`): each combination is compiled ahead of time with
libtpu's compile-only devices by `embedjax aot` in its own process (no TPU needed), and a table is printed.

    python bench/aot_remat_scan.py                                  # Sentence-T5-XXL on v5e-256 (batch 2048)
    python bench/aot_remat_scan.py --config configs/sentence_t5.py:base,random --topology v5e-16
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

GiB = 2 ** 30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/sentence_t5.py:xxl,random")
    p.add_argument("--topology", default="v5e-256")
    p.add_argument("--remat", default="none,full", help="comma-separated remat policies")
    p.add_argument("--scan", default="False,True", help="comma-separated scan_layers values")
    p.add_argument("--set", action="append", default=[], help="further config overrides, KEY=VALUE")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scan in args.scan.split(","):
            for remat in args.remat.split(","):
                out = Path(tmp) / f"{remat}-{scan}.json"
                cmd = [sys.executable, "-m", "embedjax.cli", "aot", "--config", args.config, "--topology",
                       args.topology, "--set", f"remat_policy={remat}", "--set", f"scan_layers={scan}",
                       "--json", str(out), *[a for s in args.set for a in ("--set", s)]]
                t0 = time.time()
                r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
                wall = time.time() - t0
                if r.returncode not in (0, 1) or not out.is_file():   # 1: "does not fit"
                    sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
                rep = json.loads(out.read_text())
                rows.append((remat, scan, rep, wall))
                print(f"done: remat={remat} scan_layers={scan} in {wall:.0f} s", file=sys.stderr, flush=True)
    rep = rows[0][2]
    print(f"{args.config} on {args.topology}: mesh {rep['mesh']}, {rep['num_hosts']} host(s), batch "
          f"{rep['batch_size']} x {rep['seq_lengths']}, {rep['num_params'] / 1e9:.2f}B parameters, per-chip HBM "
          f"{(rep['hbm_bytes'] or 0) / GiB:.2f} GiB; load {os.getloadavg()[0]:.2f}")
    print("| remat_policy | scan_layers | peak per chip | temporaries | fits | compile |")
    print("|---|---|---|---|---|---|")
    for remat, scan, rep, wall in rows:
        temps = (rep["compiled"] or {}).get("temporaries")
        print(f"| {remat} | {scan} | {rep['peak_bytes'] / GiB:.2f} GiB | "
              f"{'-' if temps is None else f'{temps / GiB:.2f} GiB'} | {'yes' if rep['fits'] else 'no'} | "
              f"{rep['compile_seconds'] or 0:.0f} s |")


if __name__ == "__main__":
    main()
