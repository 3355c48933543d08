"""TFDS builders from local files and seqio tasks: prompts applied, ids equal the HF tokenizer's, mixture
rates, per-host sharding (disjoint, complete, text groups kept together)."""

from __future__ import annotations

import numpy as np
import pytest
from _data_helpers import write_jsonl

tf = pytest.importorskip("tensorflow")
seqio = pytest.importorskip("seqio")

from embedjax.data import tasks  # noqa: E402
from embedjax.data.prompts import prompt_preset  # noqa: E402
from embedjax.data.sources import DataError  # noqa: E402
from embedjax.data.tfds_builders import prepare_dataset  # noqa: E402


def test_builder_from_jsonl_keeps_order_and_counts_skips(tmp_path, tfds_dir):
    rows = [
        {
            "query": f"q{i}",
            "positive": {"title": "T", "text": f"p{i}"},
            "negatives": [f"n{i}", f"m{i}"],
            "scores": [1.0, 0.5, 0.25],
        }
        for i in range(30)
    ]
    p = write_jsonl(tmp_path / "trip.jsonl", rows[:10] + ["{broken"] + rows[10:])
    with pytest.raises(DataError, match=r"trip.jsonl:11: not valid JSON"):
        prepare_dataset("pairs", p, data_dir=tmp_path / "tfds_raise")
    b = prepare_dataset("pairs", p, data_dir=tfds_dir, on_error="skip")
    assert b.info.splits["train"].num_examples == 30
    assert b.info.metadata["read_stats"]["train"]["skipped"] == 1
    got = list(b.as_dataset("train").as_numpy_iterator())
    assert [int(e["idx"]) for e in got] == list(range(30))
    assert got[3]["query"] == b"q3" and got[3]["positive_title"] == b"T"
    assert got[3]["negatives"].tolist() == [b"n3", b"m3"] and got[3]["scores"].tolist() == [1.0, 0.5, 0.25]
    b2 = prepare_dataset("pairs", p, data_dir=tfds_dir, on_error="skip")  # reused, same config
    assert b2.data_path == b.data_path
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no examples"):
        prepare_dataset("pairs", tmp_path / "empty.jsonl", data_dir=tfds_dir)


def test_task_applies_prompts_and_matches_hf_ids(scifact_builder, minilm_vocab, hf_minilm, scifact_pairs):
    for name, prompt in (
        ("e5", prompt_preset("e5")),
        ("gecko", prompt_preset("gecko", task="claim verification")),
    ):
        tasks.add_task(f"t_prompt_{name}", scifact_builder, minilm_vocab, prompt=prompt)
        ts = tasks.load_tokenized(f"t_prompt_{name}", "train", {"query": 48, "positive": 128})[
            f"t_prompt_{name}"
        ]
        assert len(ts) == len(scifact_pairs) == 919
        for i in range(0, 919, 37):
            ex = scifact_pairs[int(ts.idx[i])]
            q = prompt.format_query(ex["query"])
            d = prompt.format_document(ex["positive"], ex["positive_title"])
            if name == "gecko":
                assert q.startswith("task: claim verification | query: ") and d.startswith("title: ")
            else:
                assert q.startswith("query: ") and d.startswith("passage: ")
            assert ts.query(i).tolist() == hf_minilm(q, truncation=True, max_length=48)["input_ids"]
            assert ts.positive(i).tolist() == hf_minilm(d, truncation=True, max_length=128)["input_ids"]


def test_symmetric_task_and_negatives(tmp_path, tfds_dir, minilm_vocab, hf_minilm):
    rows = [
        {
            "query": "What is a cat?",
            "positive": {"title": "Cats", "text": "A cat is an animal."},
            "negatives": ["Dogs bark.", {"title": "Cars", "text": "Cars drive."}],
            "scores": [0.9, 0.3, 0.1],
        },
        {"query": "Second question", "positive": "Second answer"},
    ]
    b = prepare_dataset("pairs", write_jsonl(tmp_path / "n.jsonl", rows), data_dir=tfds_dir)
    e5 = prompt_preset("e5")
    tasks.add_task("t_negs", b, minilm_vocab, prompt=e5)
    ts = tasks.load_tokenized("t_negs", "train", {"query": 32, "positive": 32})["t_negs"]
    assert ts.num_negatives(0) == 2 and ts.num_negatives(1) == 0
    assert (
        ts.negative(0, 1).tolist()
        == hf_minilm("passage: Cars Cars drive.", truncation=True, max_length=32)["input_ids"]
    )
    assert ts.example_scores(0).tolist() == pytest.approx([0.9, 0.3, 0.1]) and len(ts.example_scores(1)) == 0
    tasks.add_task("t_sym", b, minilm_vocab, prompt=e5, symmetric=True)
    ts = tasks.load_tokenized("t_sym", "train", {"query": 32, "positive": 32})["t_sym"]
    assert (
        ts.positive(0).tolist()
        == hf_minilm("query: A cat is an animal.", truncation=True, max_length=32)["input_ids"]
    )


def test_mixture_rates_are_checked(scifact_builder, stsb_builder, minilm_vocab):
    tasks.add_task("t_mix_a", scifact_builder, minilm_vocab)
    tasks.add_task("t_mix_b", stsb_builder, minilm_vocab, symmetric=True)
    with pytest.raises(DataError, match="every task has rate 0"):
        tasks.add_mixture("m_zero", [("t_mix_a", 0.0), ("t_mix_b", 0)])
    with pytest.raises(DataError, match="rate -1"):
        tasks.add_mixture("m_neg", [("t_mix_a", 1.0), ("t_mix_b", -1)])
    tasks.add_mixture("m_ok", [("t_mix_a", 2.0), ("t_mix_b", 0.0)])
    assert tasks.task_rates("m_ok") == {"t_mix_a": 2.0, "t_mix_b": 0.0}
    # A seqio Mixture registered directly (bypassing add_mixture) is still refused at load time.
    seqio.MixtureRegistry.remove("m_direct")
    seqio.MixtureRegistry.add("m_direct", [("t_mix_a", 0.0), ("t_mix_b", 0.0)])
    with pytest.raises(DataError, match="every task has rate 0"):
        tasks.load_tokenized("m_direct", "train", {"query": 16, "positive": 16})


@pytest.mark.parametrize("shard_by", ["text_groups", "index"])
def test_two_hosts_read_disjoint_data_covering_everything(
    scifact_builder, minilm_vocab, scifact_pairs, shard_by
):
    tasks.add_task(f"t_hosts_{shard_by}", scifact_builder, minilm_vocab, shard_by=shard_by)
    parts = [
        tasks.load_tokenized(
            f"t_hosts_{shard_by}", "train", {"query": 32, "positive": 32}, shard_index=h, num_shards=2
        )[f"t_hosts_{shard_by}"]
        for h in (0, 1)
    ]
    idx0, idx1 = set(parts[0].idx.tolist()), set(parts[1].idx.tolist())
    assert not idx0 & idx1 and idx0 | idx1 == set(range(len(scifact_pairs)))
    assert min(len(idx0), len(idx1)) >= 0.45 * len(scifact_pairs)  # balanced
    again = tasks.load_tokenized(
        f"t_hosts_{shard_by}", "train", {"query": 32, "positive": 32}, shard_index=0, num_shards=2
    )[f"t_hosts_{shard_by}"]
    assert again.idx.tolist() == parts[0].idx.tolist()  # deterministic
    if shard_by == "text_groups":
        # No raw text (query or document) is held by both hosts, so per-host dedup is global dedup.
        def texts(idx):
            return {scifact_pairs[i]["query"] for i in idx} | {
                (scifact_pairs[i]["positive_title"] + " " + scifact_pairs[i]["positive"]).strip() for i in idx
            }

        assert not texts(idx0) & texts(idx1)
        shared_doc = {}
        for i, ex in enumerate(scifact_pairs):
            shared_doc.setdefault(ex["positive_id"], []).append(i)
        assert any(len(v) > 1 for v in shared_doc.values())  # the data does have shared documents


def test_too_many_hosts_for_text_groups(tmp_path, tfds_dir, minilm_vocab):
    rows = [{"query": "same query", "positive": f"doc {i}"} for i in range(4)]  # one text group
    b = prepare_dataset("pairs", write_jsonl(tmp_path / "one_group.jsonl", rows), data_dir=tfds_dir)
    tasks.add_task("t_one_group", b, minilm_vocab)
    with pytest.raises(DataError, match="only 1 group"):
        tasks.load_tokenized(
            "t_one_group", "train", {"query": 16, "positive": 16}, shard_index=0, num_shards=2
        )
    with pytest.raises(TypeError, match="load_vocabulary"):
        tasks.add_task("t_bad_vocab", b, seqio.PassThroughVocabulary(10))


def test_keys_equal_for_equal_texts(scifact_tokenized, scifact_pairs):
    ts = scifact_tokenized
    by_doc: dict[str, set[int]] = {}
    for i in range(len(ts)):
        by_doc.setdefault(scifact_pairs[int(ts.idx[i])]["positive_id"], set()).add(int(ts.example_keys(i)[1]))
    assert all(len(v) == 1 for v in by_doc.values())
    assert len({next(iter(v)) for v in by_doc.values()}) == len(by_doc)  # different docs, different keys
    assert np.all(np.diff(ts.key_off) == 2)
