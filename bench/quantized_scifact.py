"""nDCG@10 and index bytes per document of compact SciFact indexes with all-MiniLM-L6-v2 (no training): float32,
int8, binary, and binary re-ranked with int8 / float32, at the full 384 and at 128 dimensions (Matryoshka-style
truncation, re-normalised). For int8 and binary the same search also runs over sentence-transformers'
`quantize_embeddings` codes (the peer), in the same process on the same embeddings and calibration ranges.

    python bench/quantized_scifact.py [--config configs/minilm_scifact.py]

The corpus embeddings come from the evaluation cache (shipped for this config), so this takes about a minute.
"""
from __future__ import annotations

import argparse
import copy
import os
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/minilm_scifact.py")
    args = p.parse_args()
    from sentence_transformers.util.quantization import quantize_embeddings

    from embedjax import quantize as qz
    from embedjax.config import load_config
    from embedjax.evaluate import encode_fn_from_encoder
    from embedjax.evaluate.retrieval import RetrievalEvaluator
    from embedjax.evaluate.ship_cache import pretrained_encoder
    from embedjax.trainer import build_evaluators

    config = load_config(args.config)
    encoder = pretrained_encoder(config)
    evs = [e for e in build_evaluators(config).values() if isinstance(e, RetrievalEvaluator)]
    if not evs:
        raise SystemExit(f"{args.config}: no BEIR evaluation task")
    base = evs[0]
    inner = encode_fn_from_encoder(encoder, batch_size=config.eval.batch_size)
    queries: dict[str, object] = {}

    def encode(texts, role):   # queries encoded once for every row; documents come from the cache
        if role != "query":
            return inner(texts, role)
        key = tuple(texts)
        if key not in queries:
            queries[key] = inner(texts, role)
        return queries[key]
    encode.cache_key = inner.cache_key

    def peer(emb, precision, ranges):
        return quantize_embeddings(emb, precision=precision, ranges=ranges)

    rows = [("float32", "float32", None), ("int8", "int8", None), ("binary", "binary", None),
            ("binary, int8 rescoring", "binary", "int8"), ("binary, float32 rescoring", "binary", "float32")]
    print(f"{base.name}: {len(base.query_ids)} queries, {len(base.data.doc_ids)} documents; model "
          f"{config.init_from} at {encoder.max_length} tokens; load {os.getloadavg()[0]:.2f}")
    print("| index | dim | nDCG@10 embedjax | nDCG@10 sentence-transformers codes | bytes/doc (search) | "
          "bytes/doc (rescoring) | search s |")
    print("|---|---|---|---|---|---|---|")
    for dim in (None, 128):
        for label, precision, rescore in rows:
            out = {}
            for who, quantizer in (("embedjax", None), ("peer", peer)):
                if who == "peer" and precision == "float32":
                    continue
                ev = copy.copy(base)
                ev.precision, ev.rescore, ev.dim, ev.ranges = precision, rescore, dim, None
                ev.quantizer = quantizer or qz.quantize
                ev.show_progress, ev.use_cache = False, True   # the (shipped) corpus cache
                t0 = time.perf_counter()
                m = ev.run(encode)
                out[who] = (m["ndcg@10"], dict(ev.last_info), time.perf_counter() - t0)
            nd, info, secs = out["embedjax"]
            peer_nd = f"{out['peer'][0] * 100:.2f}" if "peer" in out else "–"
            print(f"| {label} | {dim or encoder.dim} | {nd * 100:.2f} | {peer_nd} | {info['index_bytes_per_doc']} | "
                  f"{info.get('rescore_bytes_per_doc', '–')} | {secs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
