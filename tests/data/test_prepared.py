"""Prepared data: sources in four file formats, per-task prompts, indexed shards, per-host shard ownership,
streaming iteration that never materialises a task, exact resume, text keys for false-negative masks."""
from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from embedjax.data import prepared, records
from embedjax.data.pipeline import KeyedPermutation
from embedjax.data.prompts import task_prompt
from embedjax.data.sources import DataError, doc_text
from embedjax.tokenize import TextTokenizer, load_tokenizer

from _mixture import GECKO, INSTR, scifact_rows, write_sources  # noqa: E402


@pytest.fixture(scope="module")
def minilm_tok(minilm_dir):
    return TextTokenizer(load_tokenizer(minilm_dir), 64)


@pytest.fixture(scope="module")
def prep(tmp_path_factory, shipped, minilm_tok):
    root = tmp_path_factory.mktemp("prep")
    rows = scifact_rows(shipped)
    srcs = write_sources(root / "in", rows)
    m = prepared.prepare(prepared.file_inputs(srcs), minilm_tok, root / "out", max_query_length=32,
                         max_doc_length=64, prompts=GECKO, rows_per_shard=40, show_progress=False)
    return root, rows, srcs, m


def test_manifest_counts_tasks_and_shards(prep):
    _, rows, _, m = prep
    assert m["tasks"]["fact"]["examples"] == len(rows["fact"]) and m["tasks"]["title"]["examples"] == len(rows["title"])
    # 4 files per task; 60 'fact' rows per file split at 40 rows -> 2 shards a file; 'title': 30 rows -> 1
    assert m["tasks"]["fact"]["shards"] == 8 and m["tasks"]["title"]["shards"] == 4
    assert m["tasks"]["title"]["rate"] == 0.5 and m["tasks"]["fact"]["instruction"] == INSTR["fact"]


def test_tokens_are_the_prompted_texts_tokenised(prep, minilm_tok):
    root, rows, _, _ = prep
    data = prepared.PreparedData(root / "out")
    sh = data.shards("fact")[0]          # file 0, part 0: rows 0, 4, 8, ... of 'fact'
    ts = data.open(sh)
    pr = task_prompt(*GECKO, INSTR["fact"])
    for j in (0, 5):
        ex = rows["fact"][4 * j]
        q = pr.format_query(ex["query"])
        assert q.startswith("task: Given a scientific claim") and q.endswith(ex["query"])
        assert ts.query(j).tolist() == minilm_tok.tokenize([q], 32).ids[0]
        d = pr.format_document(ex["positive"]["text"], ex["positive"]["title"])
        assert ts.positive(j).tolist() == minilm_tok.tokenize([d], 64).ids[0]
        assert ts.example_keys(j)[1] == prepared.text_key(doc_text(ex["positive"]["title"], ex["positive"]["text"]))
        np.testing.assert_allclose(ts.example_scores(j), [0.9, 0.2, 0.1])
        assert ts.num_negatives(j) == 2


def test_formats_give_the_same_shards(tmp_path, prep, minilm_tok):
    """Parquet, TFRecord (tf.train.Example) and ArrayRecord sources prepare to the JSONL source's arrays."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from array_record.python.array_record_module import ArrayRecordWriter
    from tensorflow.core.example import example_pb2

    _, rows, _, _ = prep
    rs = [{"query": r["query"], "positive": r["positive"]["text"], "negatives": r["negatives"],
           "scores": r["scores"]} for r in rows["fact"][:30]]
    records.write_jsonl(tmp_path / "a.jsonl", rs)
    pq.write_table(pa.Table.from_pylist(rs), tmp_path / "a.parquet")

    def example(r):
        ex = example_pb2.Example()
        for k in ("query", "positive"):
            ex.features.feature[k].bytes_list.value.append(r[k].encode())
        ex.features.feature["negatives"].bytes_list.value.extend(n.encode() for n in r["negatives"])
        ex.features.feature["scores"].float_list.value.extend(r["scores"])
        return ex.SerializeToString()

    with open(tmp_path / "a.tfrecord", "wb") as f:   # TFRecord framing (CRCs are not checked on read)
        for r in rs:
            b = example(r)
            f.write(struct.pack("<Q", len(b)) + b"\0" * 4 + b + b"\0" * 4)
    w = ArrayRecordWriter(str(tmp_path / "a.array_record"), "group_size:1")
    for r in rs:
        w.write(example(r))
    w.close()
    got = {}
    for fmt in ("jsonl", "parquet", "tfrecord", "array_record"):
        src = {"name": "t", "files": str(tmp_path / f"a.{fmt}")}
        m = prepared.prepare(prepared.file_inputs([src]), minilm_tok, tmp_path / f"out_{fmt}", max_query_length=32,
                             max_doc_length=64, show_progress=False)
        ts, _ = prepared.read_shard(str(tmp_path / f"out_{fmt}" / m["shards"][0]["path"]))
        got[fmt] = ts
    for fmt in ("parquet", "tfrecord", "array_record"):
        for name in prepared.ARRAYS:
            np.testing.assert_array_equal(getattr(got[fmt], name), getattr(got["jsonl"], name), err_msg=f"{fmt} {name}")


def test_bad_rows_and_sources_name_the_file_and_row(tmp_path, minilm_tok):
    records.write_jsonl(tmp_path / "a.jsonl", [{"query": "q", "positive": "p"}, {"query": "", "positive": "p"}])
    with pytest.raises(DataError, match=r"a\.jsonl: row 2: 'query' must be a non-empty string"):
        prepared.prepare(prepared.file_inputs([{"name": "t", "files": str(tmp_path / "a.jsonl")}]), minilm_tok,
                         tmp_path / "o1", max_query_length=32, max_doc_length=64, show_progress=False)
    with pytest.raises(DataError, match="unknown key"):
        prepared.file_inputs([{"name": "t", "files": str(tmp_path / "a.jsonl"), "weight": 2}])
    with pytest.raises(DataError, match="matches no file"):
        prepared.file_inputs([{"name": "t", "files": str(tmp_path / "nope-*.jsonl")}])
    with pytest.raises(DataError, match=r"field 'question' \(mapped to 'query'\) is missing"):
        prepared.prepare(prepared.file_inputs([{"name": "t", "files": str(tmp_path / "a.jsonl"),
                                                "fields": {"query": "question"}}]), minilm_tok,
                         tmp_path / "o2", max_query_length=32, max_doc_length=64, show_progress=False)
    # a prompt using {task} needs the task's instruction
    records.write_jsonl(tmp_path / "b.jsonl", [{"query": "q", "positive": "p"}])
    with pytest.raises(DataError, match="task 'nq'.*instruction"):
        prepared.prepare(prepared.file_inputs([{"name": "nq", "files": str(tmp_path / "b.jsonl")}]), minilm_tok,
                         tmp_path / "o3", max_query_length=32, max_doc_length=64, prompts=GECKO,
                         show_progress=False)


def test_keyed_permutation_is_a_permutation():
    for n in (1, 2, 7, 64, 1000, 4097):
        p = KeyedPermutation(n, 1234)
        got = [p[i] for i in range(n)]
        assert sorted(got) == list(range(n))
        walked = []
        for i in range(n):   # the blocked NumPy values are the scalar Feistel pass's, cycle-walked
            x = p._encrypt(i)
            while x >= n:
                x = p._encrypt(x)
            walked.append(x)
        assert got == walked
        assert [p[i] for i in reversed(range(n))] == walked[::-1]   # any access order, across blocks
    a, b = KeyedPermutation(1000, 1), KeyedPermutation(1000, 2)
    assert [a[i] for i in range(20)] != [b[i] for i in range(20)]


def _iterators(root, P, **kw):
    out = []
    for h in range(P):
        data = prepared.PreparedData(root / "out")
        it = prepared.build_iterator(data, global_batch_size=8 * P, max_query_length=32, max_doc_length=64,
                                     process_index=h, process_count=P, seed=3, **kw)
        out.append((data, it))
    return out


def test_two_hosts_open_disjoint_shards_and_see_every_example_once_per_epoch(prep):
    root, rows, _, m = prep
    its = _iterators(root, 2, group_by_task=False, num_negatives=2)
    opened = [set(d.opened) for d, _ in its]
    assert not opened[0] & opened[1]
    assert opened[0] | opened[1] == {s["path"] for s in m["shards"]}
    assert all(Counter(d.opened).most_common(1)[0][1] == 1 for d, _ in its)   # each opened once
    # one epoch of each host's 'fact' share: every example exactly once over the two hosts
    seen = Counter()
    for d, it in its:
        n_fact = len(it.data["fact"])
        got = Counter()
        while it._pos["fact"]["epoch"] == 0:
            b = next(it)
            got.update(b["example_idx"][b["task_id"] == it.converter.task_ids["fact"]].tolist())
        # examples drawn in the batch that ended the epoch can belong to the next epoch: count the first n
        assert len(got) == n_fact
        seen.update(got.keys())
    assert len(seen) == len(rows["fact"]) and max(seen.values()) == 1


def test_one_task_per_batch_agrees_across_hosts_and_resumes_exactly(prep):
    root, _, _, _ = prep
    (_, a0), (_, a1) = _iterators(root, 2, num_negatives=1, with_keys=True)
    for _ in range(3):
        b0, b1 = next(a0), next(a1)
        assert len(set(b0["task_id"].tolist())) == 1 and b0["task_id"][0] == b1["task_id"][0]
    state = json.loads(json.dumps(a0.get_state()))
    straight = [next(a0) for _ in range(6)]
    (_, r0), _ = _iterators(root, 2, num_negatives=1, with_keys=True)
    r0.set_state(state)
    for b in straight:
        nb = next(r0)
        assert nb.keys() == b.keys()
        for k in b:
            np.testing.assert_array_equal(nb[k], b[k], err_msg=k)
    assert {"query_key", "positive_key", "negative_key"} <= set(straight[0])


def test_task_with_too_few_shards_for_the_hosts_is_an_error(prep):
    root, _, _, _ = prep
    data = prepared.PreparedData(root / "out")
    with pytest.raises(DataError, match="task 'title' has 4 shard.*5 processes"):
        prepared.build_iterator(data, global_batch_size=40, max_query_length=32, max_doc_length=64,
                                process_index=0, process_count=5)


def test_lengths_must_match_the_prepared_ones(prep):
    root, _, _, _ = prep
    with pytest.raises(DataError, match=r"prepared with max lengths \(32, 64\), the config asks \(32, 128\)"):
        prepared.build_iterator(prepared.PreparedData(root / "out"), global_batch_size=8, max_query_length=32,
                                max_doc_length=128)


def test_prepare_resumes_after_a_kill_and_refuses_other_data(tmp_path, shipped, minilm_tok, monkeypatch):
    rows = scifact_rows(shipped, 40)
    srcs = write_sources(tmp_path / "in", rows, files_per_task=2)
    inputs = prepared.file_inputs(srcs)
    calls = []
    real = prepared._prepare_input

    def dying(n, inp, *a, **k):
        calls.append(n)
        if n == 2:
            raise KeyboardInterrupt   # killed while preparing the third input
        return real(n, inp, *a, **k)

    monkeypatch.setattr(prepared, "_prepare_input", dying)
    with pytest.raises(KeyboardInterrupt):
        prepared.prepare(inputs, minilm_tok, tmp_path / "out", max_query_length=32, max_doc_length=64,
                         show_progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    monkeypatch.setattr(prepared, "_prepare_input", lambda n, *a, **k: (calls.append(n), real(n, *a, **k))[1])
    m = prepared.prepare(inputs, minilm_tok, tmp_path / "out", max_query_length=32, max_doc_length=64,
                         show_progress=False)
    assert calls == [0, 1, 2, 2, 3]        # inputs 0 and 1 were not read again
    assert m["stats"]["examples"] == len(rows["fact"]) + len(rows["title"])
    with pytest.raises(DataError, match="prepared differently"):
        prepared.prepare(inputs, minilm_tok, tmp_path / "out", max_query_length=16, max_doc_length=64,
                         show_progress=False)


def test_global_order_is_the_same_global_batches_on_any_host_count(prep):
    """host_order='global': every host builds the global batch and keeps its rows, so 2 hosts' rows put together
    are 1 host's batch, and a state saved with 2 hosts resumes with 1 (or 4)."""
    root, _, _, _ = prep

    def it(P, h):
        return prepared.build_iterator(prepared.PreparedData(root / "out"), global_batch_size=16, max_query_length=32,
                                       max_doc_length=64, process_index=h, process_count=P, host_order="global",
                                       seed=5, num_negatives=1)

    one, a, b = it(1, 0), it(2, 0), it(2, 1)
    for _ in range(3):
        g, x, y = next(one), next(a), next(b)
        for k in g:
            np.testing.assert_array_equal(np.concatenate([x[k], y[k]]), g[k], err_msg=k)
    state = json.loads(json.dumps(a.get_state()))
    four = [it(4, h) for h in range(4)]
    for f in four:
        f.set_state(state)
    g = next(one)
    parts = [next(f) for f in four]
    for k in g:
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), g[k], err_msg=k)


HOST = r"""
import builtins, json, sys
opened = []
real_open = builtins.open
def counting_open(path, *a, **k):
    if str(path).endswith(".ejs"):
        opened.append(str(path))
    return real_open(path, *a, **k)
builtins.open = counting_open
from embedjax.data import prepared
root, h = sys.argv[1], int(sys.argv[2])
it = prepared.build_iterator(prepared.PreparedData(root), global_batch_size=16, max_query_length=32,
                             max_doc_length=64, process_index=h, process_count=2, seed=3, group_by_task=False)
fact = it.converter.task_ids["fact"]
n, seen = len(it.data["fact"]), []
while len(set(seen)) < n:
    b = next(it)
    seen += b["example_idx"][b["task_id"] == fact].tolist()
print(json.dumps({"opened": opened, "seen": seen[:n], "n": n}))
"""


def test_two_processes_open_disjoint_files_covering_all(prep):
    """Two real processes (host 0 and 1 of 2, per-host order): the shard files each opens (counted at `open`)
    are disjoint and together all of them; over one epoch each sees its examples once, together every one."""
    import subprocess
    import sys

    root, rows, _, m = prep
    out = []
    for h in range(2):
        r = subprocess.run([sys.executable, "-c", HOST, str(root / "out"), str(h)], capture_output=True, text=True,
                           timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[2])})
        assert r.returncode == 0, r.stderr[-2000:]
        out.append(json.loads(r.stdout.strip().splitlines()[-1]))
    files = [{Path(p).relative_to(root / "out").as_posix() for p in o["opened"]} for o in out]
    # a shard is opened twice (its header, then the handle it is read through), and no other file of the data
    assert all(max(Counter(o["opened"]).values()) <= 2 for o in out)
    assert not files[0] & files[1] and files[0] | files[1] == {s["path"] for s in m["shards"]}
    assert all(len(set(o["seen"])) == o["n"] == len(o["seen"]) for o in out)  # once per epoch on each host
    assert not set(out[0]["seen"]) & set(out[1]["seen"])
    assert len(out[0]["seen"]) + len(out[1]["seen"]) == len(rows["fact"])


def test_worker_processes_give_the_same_batches_and_resume_exactly(prep):
    """data.workers: batches read and padded by two spawned processes equal the in-process iterator's, bit for
    bit, over more batches than the plans sent ahead; the state after a batch resumes the same stream, with or
    without workers; set_state drops the plans made ahead."""
    root, _, _, _ = prep
    kw = dict(num_negatives=1, with_keys=True)
    (_, plain), = _iterators(root, 1, **kw)
    (_, par), = _iterators(root, 1, workers=2, **kw)
    assert isinstance(par, prepared.ParallelBatches) and par.task_names == plain.task_names
    try:
        n = 2 * par.chunk * par.ahead + 5
        state = None
        for k in range(n):
            a, b = next(plain), next(par)
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(b[key], a[key], err_msg=f"batch {k} {key}")
            assert par.get_state() == plain.get_state()
            if k == 7:
                state = json.loads(json.dumps(par.get_state()))
        straight = [next(plain) for _ in range(3)]
        par.set_state(state)                        # back to batch 8, on the same pool
        (_, fresh), = _iterators(root, 1, **kw)     # and the same state in a process without workers
        fresh.set_state(state)
        for _ in range(n - 8):
            want = next(fresh)
            got = next(par)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        for want in straight:
            got = next(par)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    finally:
        par.close()
