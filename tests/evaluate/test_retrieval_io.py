"""BEIR reading, bad-input messages, prompts and the corpus-embedding cache."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from _eval_helpers import HashEncoder, write_beir

from embedjax.evaluate.base import encode_fn_from_encoder
from embedjax.evaluate.retrieval import (
    BeirData,
    BeirFormatError,
    RetrievalEvaluator,
    apply_prompt,
    read_qrels,
)

CORPUS = [
    {"_id": "d1", "title": "Cats", "text": "cats purr and sleep all day"},
    {"_id": "d2", "title": "", "text": "dogs bark at the mail carrier"},
    {"_id": "d3", "title": "Birds", "text": "birds sing in the morning"},
    {"_id": "d4", "text": "fish swim in the sea"},  # no title field
]
QUERIES = [{"_id": "q1", "text": "why do cats purr"}, {"_id": "q2", "text": "which animals bark"},
           {"_id": "q3", "text": "morning songs"}]
QRELS = [("q1", "d1", 1), ("q2", "d2", 2), ("q3", "d3", 1)]


@pytest.fixture
def beir_dir(tmp_path):
    return write_beir(tmp_path / "toy", CORPUS, QUERIES, QRELS)


def test_reads_beir_folder(beir_dir):
    data = BeirData.load(beir_dir, "test")
    assert data.doc_ids == ["d1", "d2", "d3", "d4"]
    assert data.doc_titles[3] == "" and data.doc_texts[3] == "fish swim in the sea"
    assert data.qrels == {"q1": {"d1": 1}, "q2": {"d2": 2}, "q3": {"d3": 1}}
    ev = RetrievalEvaluator(data, use_cache=False)
    # BEIR document text: (title + " " + text).strip()
    assert ev.document_texts()[:2] == ["Cats cats purr and sleep all day", "dogs bark at the mail carrier"]


def test_end_to_end_toy(beir_dir, hash_encoder):
    ev = RetrievalEvaluator.from_beir(beir_dir, "test", use_cache=False, show_progress=False)
    m = ev.run(encode_fn_from_encoder(hash_encoder))
    assert ev.name == "toy-test"
    assert m["n_queries"] == 3 and m["n_docs"] == 4
    assert 0.0 <= m["ndcg@10"] <= 1.0 and m["recall@100"] == 1.0  # 4 docs, all retrieved
    # Word overlap makes each query's own document rank first under the bag-of-words encoder.
    assert m["mrr@10"] == 1.0


def test_missing_qrels_split(beir_dir):
    with pytest.raises(FileNotFoundError, match=r"qrels file not found: .*dev\.tsv \(available splits: test\)"):
        BeirData.load(beir_dir, "dev")


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="BEIR folder not found"):
        BeirData.load(tmp_path / "nope")


def test_malformed_json_line(beir_dir):
    lines = (beir_dir / "corpus.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-5]  # cut the closing part of line 3
    (beir_dir / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(BeirFormatError, match=r"corpus\.jsonl:3: not valid JSON"):
        BeirData.load(beir_dir)


def test_missing_id_and_duplicate_id(beir_dir):
    (beir_dir / "queries.jsonl").write_text('{"_id": "q1", "text": "a"}\n{"text": "no id"}\n')
    with pytest.raises(BeirFormatError, match=r"queries\.jsonl:2: missing field '_id'"):
        BeirData.load(beir_dir)
    (beir_dir / "corpus.jsonl").write_text('{"_id": "d1", "text": "a"}\n\n{"_id": "d1", "text": "b"}\n')
    with pytest.raises(BeirFormatError, match=r"corpus\.jsonl:3: duplicate document id 'd1' \(first on line 1\)"):
        BeirData.load(beir_dir)


def test_empty_corpus(beir_dir):
    (beir_dir / "corpus.jsonl").write_text("\n")
    with pytest.raises(BeirFormatError, match=r"corpus\.jsonl: corpus is empty"):
        BeirData.load(beir_dir)
    with pytest.raises(BeirFormatError, match="corpus is empty"):
        BeirData.from_dicts({}, {"q": "x"}, {"q": {"d": 1}})


def test_bad_qrels_lines(tmp_path):
    p = tmp_path / "q.tsv"
    p.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\tvery\n")
    with pytest.raises(BeirFormatError, match=r"q\.tsv:3: score is not an integer: 'very'"):
        read_qrels(p)
    p.write_text("query-id\tcorpus-id\tscore\nq1\td1\n")
    with pytest.raises(BeirFormatError, match=r"q\.tsv:2: expected 3 fields"):
        read_qrels(p)
    p.write_text("q1 0 d1 2\nq1 0 d2 0\n")  # TREC format, no header
    assert read_qrels(p) == {"q1": {"d1": 2, "d2": 0}}


def test_unknown_doc_and_no_relevant_are_counted(beir_dir, hash_encoder, caplog):
    (beir_dir / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\tghost\t1\nq2\td2\t0\nq3\td3\t1\nq9\td3\t1\n"
    )
    with caplog.at_level(logging.WARNING):
        ev = RetrievalEvaluator.from_beir(beir_dir, use_cache=False, show_progress=False)
    text = caplog.text
    assert "1 qrels name documents not in the corpus (first: query 'q1' -> doc 'ghost')" in text
    assert "skipped 1 queries with no relevant document in the qrels (first: 'q2')" in text
    assert "skipped 1 qrels queries missing from queries.jsonl (first: 'q9')" in text
    m = ev.run(encode_fn_from_encoder(hash_encoder))
    assert (m["n_qrels_unknown_docs"], m["n_skipped_queries_no_relevant"], m["n_queries"]) == (1, 1, 2)
    assert m["recall@100"] == pytest.approx((1 / 2 + 1) / 2)  # q1's ghost document can never be found


def test_no_evaluable_queries(beir_dir):
    (beir_dir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t0\n")
    with pytest.raises(BeirFormatError, match="no query has both a text in queries.jsonl and a relevant document"):
        RetrievalEvaluator.from_beir(beir_dir)


def test_prompts():
    assert apply_prompt("query: ", "why") == "query: why"
    assert apply_prompt("task: search result | query: {text}", "why") == "task: search result | query: why"
    assert apply_prompt(None, "body", "Title") == "Title body"
    assert apply_prompt("passage: ", "body", "") == "passage: body"
    assert apply_prompt("title: {title} | text: {text}", "body", "Title") == "title: Title | text: body"
    assert apply_prompt("title: {title} | text: {text}", "body", "") == "title: none | text: body"
    assert apply_prompt("{text} | q", "a {text} b") == "a {text} b | q"  # braces in texts are left alone
    assert apply_prompt("passage: {text}", "body", "Title") == "passage: body"   # {text}: the body, {doc}: both
    assert apply_prompt("passage: {doc}", "body", "Title") == "passage: Title body"
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['x'\]"):   # no silent pass-through
        apply_prompt("{text} {x}", "a")


def test_prompts_reach_encode_fn(beir_dir):
    seen = {"query": [], "document": []}

    def encode_fn(texts, role):
        seen[role].extend(texts)
        return np.ones((len(texts), 3), dtype=np.float32)

    ev = RetrievalEvaluator.from_beir(beir_dir, query_prompt="query: ", document_prompt="passage: ",
                                      use_cache=False, show_progress=False)
    ev.run(encode_fn)
    assert sorted(seen["query"]) == ["query: morning songs", "query: which animals bark", "query: why do cats purr"]
    assert "passage: Cats cats purr and sleep all day" in seen["document"] and len(seen["document"]) == 4


def test_bad_encode_fn_output(beir_dir):
    ev = RetrievalEvaluator.from_beir(beir_dir, use_cache=False, show_progress=False)
    with pytest.raises(ValueError, match=r"encode_fn returned shape \(2, 4\) for 3 query texts"):
        ev.run(lambda texts, role: np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="encode_fn returned NaN/Inf for query text #0"):
        ev.run(lambda texts, role: np.full((len(texts), 4), np.nan, np.float32))

    def mismatched(texts, role):
        return np.ones((len(texts), 4 if role == "query" else 5), np.float32)

    with pytest.raises(ValueError, match="document embeddings have dim 5, query embeddings 4"):
        ev.run(mismatched)


def test_cache_avoids_reencoding(beir_dir, tmp_path):
    enc = HashEncoder()
    cache = tmp_path / "cache"
    kw = {"cache_dir": cache, "show_progress": False, "corpus_chunk_size": 3}  # 2 chunks: streamed write and read
    ev = RetrievalEvaluator.from_beir(beir_dir, **kw)
    first = ev.run(encode_fn_from_encoder(enc))
    assert ev.last_info["cache_hit"] is False
    assert enc.n_encoded("document") == 4
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npy")
    meta = json.loads((cache / files[0]).read_text())
    assert meta["n_docs"] == 4 and meta["dim"] == 64

    ev2 = RetrievalEvaluator.from_beir(beir_dir, **kw)
    second = ev2.run(encode_fn_from_encoder(enc))
    assert ev2.last_info["cache_hit"] is True
    assert enc.n_encoded("document") == 4  # no new document encoding
    assert enc.n_encoded("query") == 6  # queries are always encoded
    assert second == first

    # Another model (fingerprint), another document prompt or another corpus: a miss.
    other = HashEncoder(seed=1, fingerprint="other")
    RetrievalEvaluator.from_beir(beir_dir, **kw).run(encode_fn_from_encoder(other))
    assert other.n_encoded("document") == 4
    ev3 = RetrievalEvaluator.from_beir(beir_dir, document_prompt="passage: ", **kw)
    ev3.run(encode_fn_from_encoder(enc))
    assert ev3.last_info["cache_hit"] is False and enc.n_encoded("document") == 8
    # An encode_fn without cache_key is never cached; use_cache=False neither reads nor writes.
    nokey = HashEncoder(fingerprint=None)
    ev4 = RetrievalEvaluator.from_beir(beir_dir, **kw)
    ev4.run(encode_fn_from_encoder(nokey))
    assert ev4.last_info["cache_path"] is None
    n_files = len(list(cache.iterdir()))
    RetrievalEvaluator.from_beir(beir_dir, cache_dir=cache, use_cache=False, show_progress=False).run(
        encode_fn_from_encoder(enc))
    assert len(list(cache.iterdir())) == n_files


def test_damaged_cache_is_reencoded(beir_dir, tmp_path, caplog):
    enc = HashEncoder()
    ev = RetrievalEvaluator.from_beir(beir_dir, cache_dir=tmp_path, show_progress=False)
    first = ev.run(encode_fn_from_encoder(enc))
    path = ev.cache_path(encode_fn_from_encoder(enc))
    path.write_bytes(path.read_bytes()[:-10])
    with caplog.at_level(logging.WARNING):
        again = ev.run(encode_fn_from_encoder(enc))
    assert "ignoring corpus cache" in caplog.text and "truncated" in caplog.text
    assert ev.last_info["cache_hit"] is False and again == first
    assert enc.n_encoded("document") == 8
    assert RetrievalEvaluator.from_beir(beir_dir, cache_dir=tmp_path, show_progress=False).run(
        encode_fn_from_encoder(enc)) == first and enc.n_encoded("document") == 8  # rewritten whole


def test_failed_encoding_leaves_no_cache_file(beir_dir, tmp_path):
    calls = []

    def flaky(texts, role):
        calls.append(role)
        if role == "document" and calls.count("document") == 2:
            raise RuntimeError("device lost")
        return np.ones((len(texts), 3), np.float32)

    flaky.cache_key = "flaky"
    cache = tmp_path / "cache"
    ev = RetrievalEvaluator.from_beir(beir_dir, cache_dir=cache, corpus_chunk_size=2, show_progress=False)
    with pytest.raises(RuntimeError, match="device lost"):
        ev.run(flaky)
    assert list(cache.iterdir()) == []  # the partial file was removed


def test_unwritable_cache_dir_only_warns(beir_dir, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    ev = RetrievalEvaluator.from_beir(beir_dir, cache_dir=blocker / "cache", show_progress=False)
    with caplog.at_level(logging.WARNING):
        m = ev.run(encode_fn_from_encoder(HashEncoder()))
    assert "not caching corpus embeddings: cannot write" in caplog.text
    assert m["n_queries"] == 3


def test_encode_fn_warns_about_truncation_once_per_role():
    from embedjax.evaluate import encode_fn_from_encoder

    class Fake:
        def __init__(self):
            self.flags = []

        def encode(self, texts, batch_size=1, max_length=None, prompt=None, tower="query", show_progress=None,
                   warn_truncation=True):
            self.flags.append((tower, warn_truncation))
            self.last_num_truncated = sum(len(t) > 5 for t in texts)
            return np.zeros((len(texts), 2), np.float32)

    enc = Fake()
    fn = encode_fn_from_encoder(enc)
    for piece in (["short"], ["a long text"], ["another long one"], ["x"]):
        fn(piece, "document")
    fn(["a long query"], "query")
    assert enc.flags == [("document", True), ("document", True), ("document", False), ("document", False),
                         ("query", True)]
