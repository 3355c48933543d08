"""Whitening on STS-B with all-MiniLM-L6-v2 (no training): test-split Spearman before and after whitening
fitted on the *train* split's sentences only, at the full dimension and with PCA cuts; the peer is the same
model unwhitened, in the same process on the same test pairs.

    python bench/whitening_stsb.py [--model sentence-transformers/all-MiniLM-L6-v2]
"""
from __future__ import annotations

import argparse
import copy
import os
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    p.add_argument("--data", default="embedjax/data/shipped/stsb")
    p.add_argument("--dims", default="384,256,128")
    args = p.parse_args()
    from embedjax import Encoder
    from embedjax.evaluate import encode_fn_from_encoder
    from embedjax.evaluate.sts import STSEvaluator, read_stsb, resolve_sts_path

    enc = Encoder.load(args.model)
    train = read_stsb(resolve_sts_path(args.data, "train"))
    fit_texts = list(dict.fromkeys(train.sentences1 + train.sentences2))
    test = STSEvaluator.from_file(args.data, "test", show_progress=False)
    t0 = time.time()
    base = test.run(encode_fn_from_encoder(enc))["spearman"]
    print(f"{args.model}: STS-B test {len(test.data.scores)} pairs; whitening fitted on {len(fit_texts)} train "
          f"sentences; load {os.getloadavg()[0]:.2f}")
    print("| encoder | dim | Spearman x100 (test) |")
    print("|---|---|---|")
    print(f"| unwhitened | {enc.dim} | {100 * base:.2f} |", flush=True)
    for d in (int(x) for x in args.dims.split(",")):
        w = copy.copy(enc)
        w.fit_whitening(fit_texts, dim=d)
        s = test.run(encode_fn_from_encoder(w))["spearman"]
        print(f"| whitened (train sentences) | {d} | {100 * s:.2f} |", flush=True)
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
