"""Hard-negative mining: positives never come back as negatives, the positive-aware margin filter, the output
is readable by the pipeline; `embedjax mine` end to end with all-MiniLM-L6-v2 on a slice of SciFact train."""

from __future__ import annotations

import argparse
import json
import zlib

import numpy as np
import pytest
from _data_helpers import write_jsonl

from embedjax import mine as mine_cli
from embedjax.data import mining, sources
from embedjax.data.sources import DataError


def _bow_encoder(dim: int = 512):
    """A deterministic bag-of-words embedding (hashed tokens): similar texts get similar vectors."""

    def encode(texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), dim), np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, zlib.crc32(w.encode()) % dim] += 1.0
        return out

    return encode


def _tiny_beir(tmp_path):
    d = tmp_path / "beir"
    (d / "qrels").mkdir(parents=True)
    docs = {
        "d1": ("Cats", "cats purr and sleep"),
        "d2": ("Cats", "cats purr and sleep"),  # d2: same text as d1
        "d3": ("Dogs", "dogs bark at cats"),
        "d4": ("", "cats purr"),
        "d5": ("Fish", "fish swim"),
        "d6": ("", "birds sing"),
        "d7": ("", "cats and dogs and fish"),
    }
    write_jsonl(d / "corpus.jsonl", [{"_id": k, "title": t, "text": x} for k, (t, x) in docs.items()])
    write_jsonl(
        d / "queries.jsonl", [{"_id": "q1", "text": "do cats purr"}, {"_id": "q2", "text": "what do fish do"}]
    )
    (d / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td5\t1\nq2\td7\t1\n")
    return d


def test_mining_drops_positives_and_applies_the_margin(tmp_path):
    beir = sources.read_beir(_tiny_beir(tmp_path), ("train",))
    enc = _bow_encoder()
    rows, stats = mining.mine_hard_negatives(
        beir.queries,
        beir.corpus,
        beir.qrels["train"],
        enc,
        enc,
        num_negatives=3,
        candidates=7,
        margin=0.95,
        progress=False,
    )
    assert len(rows) == stats.pairs == stats.written == 3
    for r in rows:
        positives = set(beir.qrels["train"][r["query_id"]])
        pos_texts = {sources.doc_text(*beir.corpus[p]) for p in positives}
        assert not positives & set(r["negative_ids"])
        assert not pos_texts & {sources.doc_text(n["title"], n["text"]) for n in r["negatives"]}
        assert all(s <= 0.95 * r["scores"][0] + 1e-6 for s in r["scores"][1:])
        assert r["scores"][1:] == sorted(r["scores"][1:], reverse=True)
    q1 = rows[0]
    assert "d2" not in q1["negative_ids"]  # identical text to the positive d1: a false negative
    assert stats.dropped_positive >= 2 + 3  # q1: d1, d2; q2 (twice): d5, d7
    assert "d4" not in q1["negative_ids"] and stats.dropped_margin >= 1  # "cats purr" outscores the positive
    # Independent brute-force reference: all non-positive docs with score <= margin x positive, best first.
    ids = list(beir.corpus)
    D = mining._normalize(enc([sources.doc_text(*beir.corpus[d]) for d in ids]))
    for r in rows:
        q = mining._normalize(enc([beir.queries[r["query_id"]]]))[0]
        s = D @ q
        pos = set(beir.qrels["train"][r["query_id"]])
        pos_texts = {sources.doc_text(*beir.corpus[p]) for p in pos}
        limit = 0.95 * s[ids.index(r["positive_id"])]
        want = [
            d
            for d in sorted(ids, key=lambda d: (-s[ids.index(d)], ids.index(d)))
            if d not in pos
            and sources.doc_text(*beir.corpus[d]) not in pos_texts
            and s[ids.index(d)] <= limit
        ]
        assert r["negative_ids"] == want[:3]


def test_search_goes_deeper_when_the_top_is_all_filtered(tmp_path):
    beir = sources.read_beir(_tiny_beir(tmp_path), ("train",))
    enc = _bow_encoder()
    kw = dict(num_negatives=1, candidates=1, progress=False)
    # q2's best document is its own positive d5: with depth 1 nothing qualifies.
    shallow, st = mining.mine_hard_negatives(
        beir.queries, beir.corpus, beir.qrels["train"], enc, enc, max_candidates=1, **kw
    )
    assert [r["negative_ids"] for r in shallow if r["query_id"] == "q2"] == [[], []]
    assert st.pairs_short >= 2 and st.pairs_without_negatives >= 2
    deep, st = mining.mine_hard_negatives(
        beir.queries, beir.corpus, beir.qrels["train"], enc, enc, max_candidates=8, **kw
    )
    assert all(len(r["negative_ids"]) == 1 for r in deep) and st.pairs_short == 0


def test_mined_file_feeds_the_pipeline(tmp_path):
    beir = sources.read_beir(_tiny_beir(tmp_path), ("train",))
    enc = _bow_encoder()
    rows, _ = mining.mine_hard_negatives(
        beir.queries,
        beir.corpus,
        beir.qrels["train"],
        enc,
        enc,
        num_negatives=2,
        candidates=7,
        progress=False,
    )
    path = mining.write_jsonl(rows, tmp_path / "out" / "triplets.jsonl")
    ex, st = sources.read_pairs(path)
    assert st.skipped == 0 and len(ex) == 3
    assert ex[0]["query"] == "do cats purr" and ex[0]["positive_title"] == "Cats"
    assert len(ex[0]["negatives"]) == len(rows[0]["negatives"]) and len(ex[0]["scores"]) == 1 + len(
        ex[0]["negatives"]
    )


def test_mining_bad_input(tmp_path):
    enc = _bow_encoder()
    with pytest.raises(DataError, match="not in the corpus"):
        mining.mine_hard_negatives({"q": "x"}, {"d": ("", "y")}, {"q": {"zz": 1}}, enc, enc, progress=False)
    with pytest.raises(DataError, match="no \\(query, positive\\) pairs"):
        mining.mine_hard_negatives({"q": "x"}, {"d": ("", "y")}, {"q": {"d": 0}}, enc, enc, progress=False)
    with pytest.raises(ValueError, match="margin"):
        mining.mine_hard_negatives({"q": "x"}, {"d": ("", "y")}, {"q": {"d": 1}}, enc, enc, margin=1.5)


def test_cli_parser():
    parser = argparse.ArgumentParser()
    mine_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["mine", "--model", "m", "--data", "d", "--output", "o.jsonl", "--negatives", "4"]
    )
    assert args.func is mine_cli.run and args.negatives == 4 and args.margin == 0.95 and args.split == "train"
    args.output = "o.txt"
    with pytest.raises(ValueError, match="expected a .jsonl"):
        mine_cli.run(args)


def _scifact_train_slice(src, dst, n_queries: int, n_distractors: int, seed: int = 0):
    """A BEIR folder with SciFact's first `n_queries` train queries, their positives, and random distractors."""
    import random

    rows = (src / "qrels" / "train.tsv").read_text(encoding="utf-8").splitlines()
    qrels = [r.split("\t") for r in rows[1:] if r.strip()]
    keep_q = list(dict.fromkeys(q for q, _, _ in qrels))[:n_queries]
    positives = {d for q, d, _ in qrels if q in keep_q}
    corpus = [json.loads(x) for x in (src / "corpus.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    others = sorted(c["_id"] for c in corpus if c["_id"] not in positives)
    keep_d = positives | set(random.Random(seed).sample(others, n_distractors))
    (dst / "qrels").mkdir(parents=True)
    (dst / "qrels" / "train.tsv").write_text(
        "\n".join([rows[0]] + ["\t".join(r) for r in qrels if r[0] in keep_q]) + "\n", encoding="utf-8")
    write_jsonl(dst / "queries.jsonl", [x for x in (src / "queries.jsonl").read_text(encoding="utf-8").splitlines()
                                        if x.strip() and json.loads(x)["_id"] in keep_q])
    write_jsonl(dst / "corpus.jsonl", [c for c in corpus if c["_id"] in keep_d])
    return dst


@pytest.mark.slow
def test_mine_scifact_train_with_minilm(tmp_path, shipped, minilm_dir):
    """`embedjax mine` end to end with all-MiniLM-L6-v2 on a slice of SciFact train (its first 200 queries, their
    positives and 800 other abstracts; documents cut at 128 tokens): model folder -> encode -> search -> filters ->
    triplets the pipeline reads. A real model, because "nearly every pair gets its negatives below the margin"
    needs scores that mean something (a random model scores every abstract alike and the margin drops them all);
    a slice, because the claim is about mining, and the whole corpus took minutes to embed on 2 cores."""
    data = _scifact_train_slice(shipped / "scifact", tmp_path / "scifact_slice", 200, 800)
    out = tmp_path / "scifact_triplets.jsonl"
    parser = argparse.ArgumentParser()
    mine_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["mine", "--model", str(minilm_dir), "--data", str(data), "--output", str(out),
                              "--negatives", "8", "--candidates", "50", "--max-length", "128"])
    assert mine_cli.run(args) == 0
    beir = sources.read_beir(data, ("train",))
    n_pairs = sum(len(v) for v in beir.qrels["train"].values())
    assert len(beir.queries) == 200 and n_pairs >= 200
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == n_pairs
    n_neg = 0
    for r in rows:
        positives = set(beir.qrels["train"][r["query_id"]])
        pos_texts = {sources.doc_text(*beir.corpus[p]) for p in positives}
        assert r["positive_id"] in positives
        assert not positives & set(r["negative_ids"]), r["query_id"]
        assert not pos_texts & {sources.doc_text(n["title"], n["text"]) for n in r["negatives"]}
        assert all(s <= 0.95 * r["scores"][0] + 1e-5 for s in r["scores"][1:])
        n_neg += len(r["negatives"])
    assert n_neg > 0.9 * 8 * n_pairs  # nearly every pair got its 8 negatives
    ex, st = sources.read_pairs(out)
    assert len(ex) == n_pairs and st.skipped == 0
