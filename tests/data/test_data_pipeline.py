"""Batch iterator: fixed shapes per bucket, no repeated text in a batch (one host and two), exact resume,
mixing rates, per-host global arrays."""

from __future__ import annotations

import json

import numpy as np
import pytest

from embedjax.data.pipeline import (
    BucketFeatureConverter,
    ContrastiveBatchIterator,
    TokenizedSet,
    batch_sharding,
    local_batch_size,
    make_global_batch,
)
from embedjax.data.sources import DataError, doc_text
from embedjax.tokenize import bucket_lengths


def _texts_of_batch(batch, pairs) -> list[str]:
    """Raw texts (query, positive document) of each row, looked up independently of the iterator's keys."""
    out = []
    for i in batch["example_idx"].tolist():
        ex = pairs[i]
        out += [ex["query"].strip(), doc_text(ex["positive_title"], ex["positive"])]
    return out


def _converter(num_negatives=0, tasks=("t",)):
    return BucketFeatureConverter(
        bucket_lengths(64), bucket_lengths(256), num_negatives=num_negatives, task_names=list(tasks)
    )


def test_shapes_fixed_per_bucket_and_padding_correct(scifact_tokenized):
    ts = scifact_tokenized
    it = ContrastiveBatchIterator({"t": ts}, 16, converter=_converter(), seed=1)
    shapes = set()
    for _ in range(30):
        b = next(it)
        B, Lq = b["query_ids"].shape
        Ld = b["positive_ids"].shape[1]
        assert B == 16 and Lq in bucket_lengths(64) and Ld in bucket_lengths(256)
        shapes.add((Lq, Ld))
        qlen = b["query_mask"].sum(1)
        # the bucket is the smallest that holds the longest row
        assert qlen.max() <= Lq and (
            Lq == min(bucket_lengths(64)) or qlen.max() > bucket_lengths(64)[bucket_lengths(64).index(Lq) - 1]
        )
        for r, i in enumerate(b["example_idx"].tolist()):
            row = int(np.nonzero(ts.idx == i)[0][0])
            assert b["query_ids"][r, : qlen[r]].tolist() == ts.query(row).tolist()
            assert np.all(b["query_ids"][r, qlen[r] :] == 0) and np.all(b["query_mask"][r, qlen[r] :] == 0)
            assert b["positive_ids"][r, : b["positive_mask"][r].sum()].tolist() == ts.positive(row).tolist()
        assert b["query_ids"].dtype == np.int32 and b["task_id"].tolist() == [0] * 16
    assert len(shapes) >= 2  # several buckets were used, each with a fixed shape


def test_no_duplicate_text_in_any_batch_over_an_epoch_of_scifact(scifact_tokenized, scifact_pairs):
    ts = scifact_tokenized
    it = ContrastiveBatchIterator({"t": ts}, 32, converter=_converter(), seed=0)
    seen: set[int] = set()
    deferred_max = 0
    steps = 0
    while it.get_state()["tasks"]["t"]["epoch"] == 0 or it.get_state()["tasks"]["t"]["deferred"]:
        b = next(it)
        steps += 1
        texts = _texts_of_batch(b, scifact_pairs)
        # a text may appear as query and positive of the same row only if the data says so; never across rows
        rows = [set(texts[2 * r : 2 * r + 2]) for r in range(32)]
        for r in range(32):
            others = set().union(*(rows[:r] + rows[r + 1 :]))
            assert not rows[r] & others, f"step {steps}: row {r} repeats a text of another row"
        seen.update(b["example_idx"].tolist())
        deferred_max = max(deferred_max, len(it.get_state()["tasks"]["t"]["deferred"]))
        assert steps < 60
    assert seen == set(range(919))  # every pair trained on in the epoch: deferred, never dropped
    assert deferred_max > 0  # the data has shared documents, so deduplication had work to do
    # Without dedup the same epoch does put a repeated document in some batch.
    it = ContrastiveBatchIterator({"t": ts}, 32, converter=_converter(), seed=0, dedup=False)
    dup = False
    for _ in range(29):
        texts = _texts_of_batch(next(it), scifact_pairs)
        docs = texts[1::2]
        dup |= len(set(docs)) < len(docs)
    assert dup


def test_global_batch_of_two_hosts_has_no_duplicate_text(scifact_builder, minilm_vocab, scifact_pairs):
    from embedjax.data import tasks

    tasks.add_task("t_global", scifact_builder, minilm_vocab)
    its = [
        tasks.build_iterator(
            "t_global",
            "train",
            global_batch_size=64,
            max_query_length=64,
            max_doc_length=256,
            process_index=h,
            process_count=2,
            seed=3,
        )
        for h in (0, 1)
    ]
    for step in range(20):
        b0, b1 = next(its[0]), next(its[1])
        assert b0["query_ids"].shape[0] == b1["query_ids"].shape[0] == 32
        texts = _texts_of_batch(b0, scifact_pairs) + _texts_of_batch(b1, scifact_pairs)
        per_row = [frozenset(texts[2 * r : 2 * r + 2]) for r in range(64)]
        assert len(set().union(*per_row)) == sum(len(s) for s in per_row), f"step {step}: repeated text"


def _scifact_triplets(path, pairs, corpus_docs):
    """SciFact train pairs with 4 negatives each: 2 positives of other pairs, 2 corpus documents."""
    from _data_helpers import write_jsonl

    rows = []
    n = len(pairs)
    for i, ex in enumerate(pairs):
        others = [pairs[(i + d) % n] for d in (1, 7)]
        negs = [{"title": o["positive_title"], "text": o["positive"]} for o in others]
        negs += [
            {"title": t, "text": x}
            for t, x in (
                corpus_docs[(31 * i) % len(corpus_docs)],
                corpus_docs[(57 * i + 3) % len(corpus_docs)],
            )
        ]
        rows.append(
            {
                "query": ex["query"],
                "positive": {"title": ex["positive_title"], "text": ex["positive"]},
                "negatives": negs,
            }
        )
    return write_jsonl(path, rows)


def test_two_hosts_with_hard_negatives_hold_no_false_negative(
    tmp_path, shipped, tfds_dir, minilm_vocab, scifact_pairs
):
    from embedjax.data import sources, tasks
    from embedjax.data.tfds_builders import prepare_dataset

    beir = sources.read_beir(shipped / "scifact", ("train",))
    corpus_docs = list(beir.corpus.values())
    path = _scifact_triplets(tmp_path / "trip.jsonl", scifact_pairs, corpus_docs)
    raw, _ = sources.read_pairs(path)
    tasks.add_task("t_trip", prepare_dataset("pairs", path, data_dir=tfds_dir), minilm_vocab)
    its = [
        tasks.build_iterator(
            "t_trip",
            "train",
            global_batch_size=64,
            max_query_length=64,
            max_doc_length=128,
            num_negatives=3,
            process_index=h,
            process_count=2,
            seed=1,
        )
        for h in (0, 1)
    ]
    sizes = [len(it.data["t_trip"]) for it in its]
    assert sum(sizes) == len(raw) and min(sizes) > 0.4 * len(raw)  # negatives do not glue the data together
    assert all(it.dropped_negatives["t_trip"] > 0 for it in its)  # other hosts' positives were excluded
    used_negs = 0
    for step in range(15):
        qp, negs = [], []
        for it in its:
            b = next(it)
            for r, i in enumerate(b["example_idx"].tolist()):
                ex = raw[i]
                qp.append([ex["query"].strip(), doc_text(ex["positive_title"], ex["positive"])])
                for j in b["negative_index"][r][b["negative_valid"][r]].tolist():
                    negs.append(doc_text(ex["negative_titles"][j], ex["negatives"][j]))
        flat_qp = [t for row in qp for t in row]
        rows = [set(x) for x in qp]
        assert sum(len(x) for x in rows) == len(set().union(*rows)), f"step {step}: a query/positive repeats"
        assert not set(negs) & set(flat_qp), f"step {step}: a positive is also a negative (false negative)"
        used_negs += len(negs)
    assert used_negs > 15 * 64 * 2  # most rows still get negatives


def _triplet_set(n=200, negs=5, seed=0) -> TokenizedSet:
    """Synthetic tokenized triplets (texts keyed by their ids): some positives shared by several examples,
    negatives drawn from a shared pool, scores on two thirds of the rows."""
    rng = np.random.default_rng(seed)
    q = [rng.integers(1000, 2000, rng.integers(3, 30)).tolist() for _ in range(n)]
    docs = [rng.integers(2000, 3000, rng.integers(3, 90)).tolist() for _ in range(3 * n // 4)]
    p = [docs[j] for j in rng.integers(0, len(docs), n)]  # repeated positives: deferrals
    pool = [rng.integers(3000, 4000, rng.integers(3, 90)).tolist() for _ in range(n)]  # shared negatives
    ng = [
        [pool[j] for j in rng.choice(len(pool), rng.integers(0, negs + 3), replace=False)] for _ in range(n)
    ]
    sc = [rng.random(1 + len(x)).tolist() if i % 3 else [] for i, x in enumerate(ng)]
    return TokenizedSet.from_lists(list(range(n)), q, p, ng, scores=sc)


def _mixed_iterator(seed=5, group_by_task=False):
    data = {"a": _triplet_set(200, seed=1), "b": _triplet_set(90, seed=2)}
    conv = BucketFeatureConverter(
        bucket_lengths(32), bucket_lengths(96), num_negatives=3, task_names=["a", "b"]
    )
    return ContrastiveBatchIterator(
        data,
        24,
        rates={"a": 2.0, "b": 1.0},
        converter=conv,
        num_negatives=3,
        group_by_task=group_by_task,
        seed=seed,
    )


@pytest.mark.parametrize("group_by_task", [False, True])
def test_restored_iterator_yields_the_same_next_batches(group_by_task):
    ref = _mixed_iterator(group_by_task=group_by_task)
    states, batches = [], []
    for _ in range(40):
        states.append(json.loads(json.dumps(ref.get_state())))  # through JSON, as a checkpoint stores it
        batches.append(next(ref))
    ks = [7] + [k for k in range(1, 35) if any(s["deferred"] for s in states[k]["tasks"].values())][:2]
    assert len(ks) == 3, "no state with deferred examples: the test would not cover them"
    for k in ks:
        fresh = _mixed_iterator(group_by_task=group_by_task)
        fresh.set_state(states[k])
        for j in range(5):
            got, want = next(fresh), batches[k + j]
            assert got.keys() == want.keys()
            for key in want:
                np.testing.assert_array_equal(
                    got[key], want[key], err_msg=f"restored at {k}, batch {j}, {key}"
                )


def test_no_text_twice_in_a_batch_with_negatives():
    it = _mixed_iterator(group_by_task=False)
    for _ in range(30):
        b = next(it)
        texts = []
        for r in range(24):
            texts.append(tuple(b["query_ids"][r][b["query_mask"][r] > 0]))
            texts.append(tuple(b["positive_ids"][r][b["positive_mask"][r] > 0]))
            for k in np.nonzero(b["negative_valid"][r])[0]:
                texts.append(tuple(b["negative_ids"][r, k][b["negative_mask"][r, k] > 0]))
        assert len(texts) == len(set(texts))
    assert it.skipped_negatives > 0  # the shared pool made some negatives collide: they were replaced


def test_negatives_scores_and_masks():
    it = _mixed_iterator(group_by_task=False)
    b = next(it)
    assert b["negative_ids"].shape[:2] == (24, 3) and b["negative_mask"].shape == b["negative_ids"].shape
    assert b["scores"].shape == (24, 4) and b["scores_valid"].shape == (24, 4)
    v = b["negative_valid"]
    assert np.all(b["negative_mask"][~v] == 0) and np.all(b["negative_mask"][v].sum(-1) > 0)
    assert v.sum() > 0 and (~v).sum() > 0  # some rows have fewer than 3 negatives
    assert np.all((b["negative_index"] >= 0) == v)
    for r in range(24):
        if b["scores_valid"][r, 0]:
            assert np.array_equal(b["scores_valid"][r, 1:], v[r])
    assert set(b["task_id"].tolist()) <= {0, 1}


def test_negative_equal_to_a_positive_of_its_query_is_not_used(caplog):
    # Rows 0 and 2 share a query; row 0's negatives are its own positive, row 2's positive, and [15].
    q, p = [[5, 6], [7, 8], [5, 6]], [[9, 10], [11, 12], [13]]
    ts = TokenizedSet.from_lists([0, 1, 2], q, p, [[[9, 10], [13], [15]], [[14]], []])
    it = ContrastiveBatchIterator({"t": ts}, 1, converter=_converter(2), num_negatives=2, seed=0)
    assert it.dropped_negatives == {"t": 2} and "2 negative(s) equal to their query" in caplog.text
    for _ in range(3):
        b = next(it)
        if b["example_idx"][0] == 0:
            assert b["negative_valid"][0].tolist() == [True, False]
            assert b["negative_index"][0, 0] == 2 and b["negative_ids"][0, 0, 0] == 15
            break
    else:
        pytest.fail("row 0 never came up")


def test_mixing_rates_are_followed():
    it = _mixed_iterator(group_by_task=True)
    tasks = [int(next(it)["task_id"][0]) for _ in range(300)]
    frac_a = tasks.count(0) / len(tasks)
    assert 0.58 < frac_a < 0.75  # rate 2:1 -> 2/3
    it = _mixed_iterator(group_by_task=False)
    ids = np.concatenate([next(it)["task_id"] for _ in range(50)])
    assert 0.6 < (ids == 0).mean() < 0.73


def test_bad_inputs_give_clear_errors():
    small = TokenizedSet.from_lists([0, 1, 2], [[1], [1], [2]], [[3], [4], [5]])  # rows 0 and 1 share a query
    it = ContrastiveBatchIterator({"t": small}, 3, converter=_converter(), seed=0)
    with pytest.raises(DataError, match="cannot fill a batch of 3 rows without repeating a text"):
        next(it)
    with pytest.raises(DataError, match="every task has rate 0"):
        ContrastiveBatchIterator({"t": small}, 2, rates={"t": 0.0})
    with pytest.raises(DataError, match="no data"):
        ContrastiveBatchIterator({"t": small}, 2, rates={"t": 1.0, "u": 1.0})
    ref = _mixed_iterator()
    other = _mixed_iterator(seed=6)
    with pytest.raises(ValueError, match="seed"):
        other.set_state(ref.get_state())
    st = ref.get_state()
    st["data"] = "0" * 16
    with pytest.raises(ValueError, match="different data"):
        ref.set_state(st)
    with pytest.raises(ValueError, match="not divisible"):
        local_batch_size(10, 4)


def test_make_global_batch_on_the_mesh():
    import jax

    devices = np.asarray(jax.devices())
    mesh = jax.sharding.Mesh(devices.reshape(-1, 1), ("data", "model"))
    it = _mixed_iterator()
    local = next(it)
    sharding = batch_sharding(mesh, "data")
    glob = make_global_batch(local, sharding)
    assert set(glob) == set(local)
    for k, v in glob.items():
        assert v.shape == local[k].shape and v.sharding == sharding
        np.testing.assert_array_equal(np.asarray(v), local[k])
    if len(devices) > 1:  # each device holds its slice of the batch only
        shard_rows = {s.data.shape[0] for s in glob["query_ids"].addressable_shards}
        assert shard_rows == {24 // len(devices)}
