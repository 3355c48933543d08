"""Compact indexes: embedjax's int8 / uint8 / binary / ubinary codes equal sentence-transformers'
`quantize_embeddings` bit for bit; the scores over codes are the float query against the dequantised documents
(int8) and minus the Hamming distance (binary); the BEIR evaluator searches a quantised index streamed chunk by
chunk, re-ranks binary candidates with int8 / float32, truncates to Matryoshka dims, and calibrates int8 ranges
from a random corpus sample read from the cache or encoded alike."""
import numpy as np
import pytest

from embedjax import quantize as qz
from embedjax.evaluate.retrieval import BeirData, RetrievalEvaluator

st = pytest.importorskip("sentence_transformers")


def _quantize_st(emb, precision, ranges=None):
    from sentence_transformers.util.quantization import quantize_embeddings
    return quantize_embeddings(emb, precision=precision, ranges=ranges)


def test_codes_equal_sentence_transformers_bit_for_bit():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(200, 37)).astype(np.float32)      # 37: not a multiple of 8 (padding bits)
    ranges = qz.calibration_ranges(emb[:100])
    for precision in ("int8", "uint8", "binary", "ubinary", "float32"):
        ours = qz.quantize(emb, precision, ranges)
        theirs = _quantize_st(emb, precision, ranges)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, precision
        np.testing.assert_array_equal(ours, theirs, err_msg=precision)
    assert qz.quantize(emb, "ubinary").shape == (200, 5) and qz.bytes_per_vector(37, "binary") == 5
    with pytest.raises(ValueError, match="needs calibration ranges"):
        qz.quantize(emb, "int8")
    with pytest.raises(ValueError, match="precision must be one of"):
        qz.quantize(emb, "int4")


def test_scores_over_codes():
    rng = np.random.default_rng(1)
    q, d = rng.normal(size=(7, 37)).astype(np.float32), rng.normal(size=(50, 37)).astype(np.float32)
    ranges = qz.calibration_ranges(d)
    for p in ("int8", "uint8"):
        codes = qz.quantize(d, p, ranges)
        np.testing.assert_allclose(qz.score(q, codes, p, ranges), q @ qz.dequantize(codes, p, ranges).T,
                                   rtol=1e-4, atol=1e-4)
        assert np.abs(qz.dequantize(codes, p, ranges) - d).max() <= (ranges[1] - ranges[0]).max() / 255 + 1e-6
    for p in ("binary", "ubinary"):
        codes = qz.quantize(d, p)
        hamming = ((q[:, None, :] > 0) != (d[None, :, :] > 0)).sum(-1)
        np.testing.assert_array_equal(qz.score(q, codes, p, dim=37), -hamming)


def _toy(n_docs=300, n_q=40, dim=64, seed=0):
    rng = np.random.default_rng(seed)
    docs = rng.normal(size=(n_docs, dim)).astype(np.float32)
    rel = rng.choice(n_docs, n_q, replace=False)
    queries = docs[rel] + 0.9 * rng.normal(size=(n_q, dim)).astype(np.float32)
    vec = {f"doc {i}": docs[i] for i in range(n_docs)} | {f"query {j}": queries[j] for j in range(n_q)}
    data = BeirData.from_dicts({f"d{i}": f"doc {i}" for i in range(n_docs)},
                               {f"q{j}": f"query {j}" for j in range(n_q)},
                               {f"q{j}": {f"d{rel[j]}": 1} for j in range(n_q)})
    calls = {"document": 0}

    def encode(texts, role):
        calls[role] = calls.get(role, 0) + len(texts)
        return np.stack([vec[t] for t in texts])
    encode.cache_key = f"toy-{seed}"
    return data, encode, calls, docs


def test_evaluator_over_quantized_indexes(tmp_path):
    data, encode, calls, docs = _toy()
    kw = dict(cache_dir=tmp_path, show_progress=False, corpus_chunk_size=64)
    base = RetrievalEvaluator(data, **kw)
    ref = base.run(encode)
    assert base.last_info["index_bytes_per_doc"] == 256
    # binary candidates re-ranked with float32 over every document: exactly the float search
    ev = RetrievalEvaluator(data, precision="binary", rescore="float32", rescore_multiplier=30, **kw)
    assert ev.run(encode) == ref
    assert ev.last_info["index_bytes_per_doc"] == 8 and ev.last_info["rescore_bytes_per_doc"] == 256
    # int8 close to float32, binary further, each with its index size; the streamed search equals a brute
    # force search over the whole quantised corpus
    for p, per_doc in (("int8", 64), ("uint8", 64), ("binary", 8), ("ubinary", 8)):
        ev = RetrievalEvaluator(data, precision=p, **kw)
        got = ev.run(encode)
        assert ev.last_info["index_bytes_per_doc"] == per_doc, p
        assert got["ndcg@10"] > (0.9 if "int8" in p else 0.6) * ref["ndcg@10"], (p, got["ndcg@10"], ref["ndcg@10"])
        res = ev.search(encode)
        qv = np.stack([encode([data.queries[q]], "query")[0] for q in res.query_ids])
        qv /= np.linalg.norm(qv, axis=1, keepdims=True)
        dv = docs / np.linalg.norm(docs, axis=1, keepdims=True)
        ranges = None
        if p in qz.SCALAR:   # the evaluator's ranges: a seeded random sample of 64 documents, in stream order
            pos = np.sort(np.random.default_rng(0).choice(300, size=64, replace=False))
            order = np.argsort(-np.array([len(f"doc {i}") for i in range(300)]), kind="stable")
            ranges = qz.calibration_ranges(dv[order[pos]])
        brute = qz.score(qv, qz.quantize(dv, p, ranges), p, ranges, 64)
        compared = 0
        for qi in range(len(res.query_ids)):
            srt = np.sort(brute[qi])[::-1]
            if srt[9] == srt[10]:
                continue    # a tie at the cut-off: either document may be 10th
            compared += 1
            assert sorted(res.doc_ids[qi][:10]) == sorted(data.doc_ids[i] for i in np.argsort(-brute[qi])[:10]), p
        assert compared >= 10, p
    # Matryoshka: dim=D is the full search; dim=16 equals encoding truncated vectors
    assert RetrievalEvaluator(data, dim=64, **kw).run(encode) == ref
    small = RetrievalEvaluator(data, dim=16, **kw).run(encode)

    def truncated(texts, role):
        return encode(texts, role)[:, :16]
    assert RetrievalEvaluator(data, show_progress=False, use_cache=False).run(truncated) == small
    with pytest.raises(ValueError, match="rescore re-ranks a binary"):
        RetrievalEvaluator(data, precision="int8", rescore="float32")


def test_int8_calibration_sample_is_the_same_from_cache_or_encoded(tmp_path):
    data, encode, calls, _ = _toy(seed=2)
    fresh = RetrievalEvaluator(data, precision="int8", use_cache=False, show_progress=False, corpus_chunk_size=50)
    a = fresh.run(encode)
    assert fresh.last_info["calibration"] == "sample of 50 documents"
    warm = dict(cache_dir=tmp_path, show_progress=False, corpus_chunk_size=50)
    RetrievalEvaluator(data, **warm).run(encode)                  # writes the cache
    before = calls["document"]
    cached = RetrievalEvaluator(data, precision="int8", **warm)
    assert cached.run(encode) == a
    assert calls["document"] == before and cached.last_info["cache_hit"]   # sample and corpus from the cache
    given = RetrievalEvaluator(data, precision="int8", ranges=np.array([[-1.0] * 64, [1.0] * 64]), **warm)
    given.run(encode)
    assert given.last_info["calibration"] == "given"


def test_encoder_quantized_outputs_calibration_saved_and_cli(tmp_path, tiny_bert_dir):
    """`Encoder.encode(precision=...)` returns the codes of its float output; int8 needs calibration ranges
    (`calibrate`, per Matryoshka dim), which `save` keeps and `load` reads back; `embedjax encode --precision`
    writes the same codes, calibrating from a file or refusing without ranges in one line."""
    import subprocess
    import sys

    from embedjax import Encoder

    enc = Encoder.load(tiny_bert_dir)
    texts = [f"document number {i} about {w}" for i, w in enumerate(["cells", "genes", "proteins", "mice"] * 25)]
    full = enc.encode(texts)
    for p in ("binary", "ubinary"):
        np.testing.assert_array_equal(enc.encode(texts, precision=p), qz.quantize(full, p))
    with pytest.raises(ValueError, match="needs calibration ranges: call Encoder.calibrate"):
        enc.encode(texts, precision="int8")
    ranges = enc.calibrate(texts, dims=[enc.dim, 16])
    assert set(ranges) == {enc.dim, 16} and ranges[16].shape == (2, 16)
    np.testing.assert_array_equal(enc.encode(texts, precision="int8"), qz.quantize(full, "int8", ranges[enc.dim]))
    small = enc.encode(texts, dim=16)
    np.testing.assert_array_equal(enc.encode(texts, dim=16, precision="int8"), qz.quantize(small, "int8", ranges[16]))
    assert enc.encode([], precision="ubinary").shape == (0, (enc.dim + 7) // 8)

    folder = enc.save(tmp_path / "model")
    back = Encoder.load(folder)
    assert sorted(back.quantization_ranges) == sorted(ranges)
    np.testing.assert_array_equal(back.encode(texts, dim=16, precision="int8"),
                                  enc.encode(texts, dim=16, precision="int8"))

    src = tmp_path / "texts.txt"
    src.write_text("\n".join(texts) + "\n")
    cli = [sys.executable, "-m", "embedjax.cli", "encode", "--input", str(src)]
    r = subprocess.run(cli + ["--model", str(tiny_bert_dir), "--output", str(tmp_path / "a.npy"), "--precision",
                              "int8"], capture_output=True, text=True)
    assert r.returncode != 0 and "has no calibration ranges for dim" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(cli + ["--model", str(tiny_bert_dir), "--output", str(tmp_path / "b.npy"), "--precision",
                              "int8", "--calibrate", str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), enc.encode(texts, precision="int8"))
    r = subprocess.run(cli + ["--model", str(folder), "--output", str(tmp_path / "c.npy"), "--precision", "ubinary"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), qz.quantize(full, "ubinary"))


def test_whitening_fit_apply_save_and_cache_key(tmp_path, tiny_bert_dir):
    """fit_whitening: on the fitting sample, whitened outputs (before re-normalisation) have zero mean and
    identity covariance; `dim` keeps the leading principal directions; the model's outputs, fingerprint (so the
    corpus cache) and calibration follow it; save / load keep it."""
    from embedjax import Encoder
    from embedjax.evaluate import encode_fn_from_encoder

    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 12)) @ rng.normal(size=(12, 12)) + 3.0
    mu, w = qz.fit_whitening(x)
    white = (x - mu) @ w
    np.testing.assert_allclose(white.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(np.cov(white, rowvar=False), np.eye(12), atol=1e-3)
    _, w4 = qz.fit_whitening(x, dim=4)
    np.testing.assert_allclose(w4, w[:, :4], rtol=1e-5, atol=1e-6)

    enc = Encoder.load(tiny_bert_dir)
    texts = [f"sentence {i} on {w}" for i, w in enumerate(["cells", "rain", "music", "trade", "stars"] * 30)]
    before_key = encode_fn_from_encoder(enc).cache_key
    plain = enc.encode(texts)
    enc.calibrate(texts)
    mu, w = enc.fit_whitening(texts, dim=16)
    assert enc.output_dim == 16 and enc.quantization_ranges == {}
    out = enc.encode(texts)
    assert out.shape == (len(texts), 16)
    np.testing.assert_allclose(out, qz.apply_whitening(plain, mu, w, normalize=True), atol=1e-5)
    assert encode_fn_from_encoder(enc).cache_key != before_key
    back = Encoder.load(enc.save(tmp_path / "white"))
    np.testing.assert_array_equal(back.encode(texts), out)
    assert encode_fn_from_encoder(back).cache_key == encode_fn_from_encoder(enc).cache_key
