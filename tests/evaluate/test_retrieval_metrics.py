"""Ranking order, chunked top-k and trec_eval metrics (hand-computed, and against pytrec_eval when installed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from embedjax.evaluate.retrieval import (
    BeirData,
    RetrievalEvaluator,
    doc_id_ranks,
    exact_search,
    keys_to_scores_ranks,
    make_keys,
    retrieval_metrics,
)

L2 = math.log2


def vector_encode_fn(vectors: dict[str, list[float]]):
    """encode_fn looking each text up in a table (texts are the table keys)."""

    def encode_fn(texts, role):
        return np.asarray([vectors[t] for t in texts], dtype=np.float32)

    return encode_fn


# Docs d1 and d2 have identical embeddings, so their scores tie exactly for every query.
VECTORS = {"D1": [1, 0.5], "D2": [1, 0.5], "D3": [1, 0.1], "D4": [1, 2], "Q1": [1, 0], "Q2": [0, 1], "Q3": [1, 1]}
CORPUS = {"d1": "D1", "d2": "D2", "d3": "D3", "d4": "D4"}
QUERIES = {"q1": "Q1", "q2": "Q2", "q3": "Q3"}
QRELS = {
    "q1": {"d1": 2, "d2": 1, "d3": 0, "d9": 1},  # graded; d9 is not in the corpus
    "q2": {"d4": 1, "d1": 0},
    "q3": {"d1": 0},  # no relevant document: skipped
    "q4": {"d1": 1},  # not in queries: skipped
}


def test_hand_computed_graded_with_ties():
    ev = RetrievalEvaluator(BeirData.from_dicts(CORPUS, QUERIES, QRELS), use_cache=False, show_progress=False)
    m = ev.run(vector_encode_fn(VECTORS))
    res = ev.search(vector_encode_fn(VECTORS))
    # q1 scores: d3 .995 > d1 = d2 .894 > d4 .447; the tie goes to the larger doc id (trec_eval): d2 before d1.
    assert res.doc_ids == [["d3", "d2", "d1", "d4"], ["d4", "d2", "d1", "d3"]]
    assert res.scores[0][1] == res.scores[0][2]
    # q1: DCG = 0 + 1/log2(3) + 2/log2(4); ideal gains 2, 1, 1 (d9 counts although it cannot be retrieved).
    ndcg_q1 = (1 / L2(3) + 2 / L2(4)) / (2 + 1 / L2(3) + 1 / L2(4))
    assert ndcg_q1 == pytest.approx(0.520909, abs=1e-6)
    assert m["ndcg@10"] == pytest.approx((ndcg_q1 + 1.0) / 2, abs=1e-12)
    assert m["ndcg@100"] == pytest.approx((ndcg_q1 + 1.0) / 2, abs=1e-12)
    assert m["ndcg@1"] == pytest.approx((0.0 + 1.0) / 2)
    assert m["recall@100"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert m["recall@1"] == pytest.approx((0.0 + 1.0) / 2)
    assert m["mrr@10"] == pytest.approx((1 / 2 + 1.0) / 2)
    assert m["mrr@1"] == pytest.approx((0.0 + 1.0) / 2)
    assert m["n_queries"] == 2
    assert m["n_qrels_unknown_docs"] == 1
    assert m["n_skipped_queries_no_relevant"] == 1
    assert m["n_skipped_queries_not_in_queries_file"] == 1
    assert set(ev.last_per_query) == {"q1", "q2"}


def test_dot_product_scores_and_cutoffs():
    ev = RetrievalEvaluator(
        BeirData.from_dicts(CORPUS, QUERIES, QRELS), k_values=(2,), score_function="dot", use_cache=False,
        show_progress=False,
    )
    m = ev.run(vector_encode_fn(VECTORS))
    # q1 by dot: d1 = d2 = d3 = d4 = 1 (all tie) -> order by id desc: d4, d3, d2, d1; top 2 = d4, d3 (gains 0, 0).
    # q2 by dot: d4 2 > d1 = d2 .5 > d3 .1 -> d4 first.
    assert m["ndcg@2"] == pytest.approx((0.0 + 1.0) / 2)
    assert m["recall@2"] == pytest.approx((0.0 + 1.0) / 2)
    assert m["mrr@2"] == pytest.approx((0.0 + 1.0) / 2)


def test_metrics_from_ranked_lists_negative_grades():
    qrels = {"a": {"x": 3, "y": -1, "z": 1}}
    mean, _ = retrieval_metrics({"a": ["y", "z", "x"]}, qrels, k_values=(2, 10))
    # Negative grades count 0 (trec_eval); ideal = [3, 1].
    assert mean["ndcg@2"] == pytest.approx((1 / L2(3)) / (3 + 1 / L2(3)))
    assert mean["ndcg@10"] == pytest.approx((1 / L2(3) + 3 / L2(4)) / (3 + 1 / L2(3)))
    assert mean["recall@2"] == pytest.approx(1 / 2)
    assert mean["mrr@2"] == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="no relevant documents"):
        retrieval_metrics({"b": ["x"]}, {"b": {"x": 0}})


def test_keys_order_and_roundtrip():
    scores = np.array([[-2.5, -0.0, 0.0, 1e-30, 0.7, 0.7, -1e-30, 3.0]], dtype=np.float32)
    ranks = np.arange(8, dtype=np.uint32)[::-1].copy()
    keys = make_keys(scores, ranks)
    back_scores, back_ranks = keys_to_scores_ranks(keys)
    np.testing.assert_array_equal(back_scores, scores)
    np.testing.assert_array_equal(back_ranks, ranks[None, :])
    order = np.argsort(keys[0])[::-1]
    expected = sorted(range(8), key=lambda i: (float(scores[0, i]), int(ranks[i])), reverse=True)
    # -0.0 and 0.0 are distinct bit patterns; only they may be ordered differently than as floats.
    assert [i for i in order if i not in (1, 2)] == [i for i in expected if i not in (1, 2)]


def brute_force(q, d, ids, k):
    out_ids, out_scores = [], []
    s = q @ d.T
    for row in s:
        top = sorted(range(len(ids)), key=lambda j: (float(row[j]), ids[j].encode()), reverse=True)[:k]
        out_ids.append([ids[j] for j in top])
        out_scores.append([float(row[j]) for j in top])
    return out_ids, out_scores


@pytest.mark.parametrize("chunk,qchunk,k", [(7, 3, 5), (1, 1, 4), (1000, 1000, 10), (13, 50, 200)])
def test_chunked_topk_equals_brute_force(chunk, qchunk, k):
    rng = np.random.default_rng(chunk + k)
    n_docs, n_q, dim = 157, 23, 8
    # Small integers: dot products are exact in float32 and tie often.
    d = rng.integers(-2, 3, size=(n_docs, dim)).astype(np.float32)
    q = rng.integers(-2, 3, size=(n_q, dim)).astype(np.float32)
    ids = [f"doc{rng.integers(0, 10**6)}-{i}" for i in range(n_docs)]
    rank, doc_of_rank = doc_id_ranks(ids)
    order = rng.permutation(n_docs)
    chunks = ((order[s:s + chunk], d[order[s:s + chunk]]) for s in range(0, n_docs, chunk))
    scores, idx = exact_search(q, chunks, rank, doc_of_rank, k, query_chunk_size=qchunk)
    want_ids, want_scores = brute_force(q, d, ids, k)
    assert [[ids[j] for j in row] for row in idx] == want_ids
    np.testing.assert_array_equal(scores, np.asarray(want_scores, dtype=np.float32))
    assert scores.shape == (n_q, min(k, n_docs))


def test_ignore_identical_ids():
    vectors = {"same": [1, 0], "near": [1, 0.2], "far": [0, 1], "mid": [1, 1]}
    corpus = {"q1": "same", "a": "near", "b": "mid", "c": "far"}
    data = BeirData.from_dicts(corpus, {"q1": "same"}, {"q1": {"a": 1}})
    fn = vector_encode_fn(vectors)
    plain = RetrievalEvaluator(data, k_values=(1, 2), use_cache=False, show_progress=False)
    assert plain.search(fn).doc_ids == [["q1", "a"]]
    assert plain.run(fn)["mrr@1"] == 0.0
    ignoring = RetrievalEvaluator(data, k_values=(1, 2), ignore_identical_ids=True, use_cache=False,
                                  show_progress=False)
    assert ignoring.search(fn).doc_ids == [["a", "b"]]  # still k = 2 hits
    assert ignoring.run(fn)["mrr@1"] == 1.0


def test_against_pytrec_eval():
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = np.random.default_rng(0)
    n_docs, n_q, dim = 300, 40, 6
    ids = [f"D{rng.integers(0, 10**5)}_{i}" for i in range(n_docs)]
    d = rng.integers(-1, 2, size=(n_docs, dim)).astype(np.float32)
    q = rng.integers(-1, 2, size=(n_q, dim)).astype(np.float32)
    qids = [f"Q{i}" for i in range(n_q)]
    qrels = {}
    for qi in qids:
        judged = rng.choice(n_docs, size=8, replace=False)
        qrels[qi] = {ids[j]: int(rng.integers(0, 4)) for j in judged}
        qrels[qi][ids[judged[0]]] = int(rng.integers(1, 4))  # at least one relevant
    vectors = {**{f"doc {i}": d[i] for i in range(n_docs)}, **{f"query {i}": q[i] for i in range(n_q)}}
    data = BeirData.from_dicts({ids[i]: f"doc {i}" for i in range(n_docs)},
                               {qids[i]: f"query {i}" for i in range(n_q)}, qrels)
    ev = RetrievalEvaluator(data, k_values=(10, 100), score_function="dot", corpus_chunk_size=37,
                            use_cache=False, show_progress=False)
    ours = ev.run(vector_encode_fn(vectors))
    # pytrec_eval gets the full run (every doc scored) and does its own tie-breaking.
    s = q @ d.T
    run = {qids[i]: {ids[j]: float(s[i, j]) for j in range(n_docs)} for i in range(n_q)}
    per_q = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    assert ours["ndcg@10"] == pytest.approx(np.mean([v["ndcg_cut_10"] for v in per_q.values()]), abs=1e-12)
    assert ours["recall@100"] == pytest.approx(np.mean([v["recall_100"] for v in per_q.values()]), abs=1e-12)
    # MRR@10: trec_eval's recip_rank on each run cut to its 10 best (score desc, then doc id desc).
    cut = {qq: dict(sorted(r.items(), key=lambda x: (x[1], x[0]), reverse=True)[:10]) for qq, r in run.items()}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
    assert ours["mrr@10"] == pytest.approx(np.mean([v["recip_rank"] for v in rr.values()]), abs=1e-12)
    # The data must actually exercise ties, or this test proves little.
    assert any(len(set(row[:20].tolist())) < 20 for row in np.sort(s, axis=1)[:, ::-1])
