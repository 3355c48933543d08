"""all-MiniLM-L6-v2 through embedjax equals sentence-transformers' own encode."""
import logging

import numpy as np


def _long_text() -> str:
    return " ".join(["The quick brown fox jumps over the lazy dog near the riverbank."] * 40)


def test_minilm_matches_sentence_transformers(minilm, st_minilm, stsb_test_sentences):
    texts = stsb_test_sentences + [_long_text()]
    assert len(stsb_test_sentences) == 2758
    assert len(minilm.tokenizer(_long_text())["input_ids"]) > 256
    before = set(minilm._compiled)   # the fixture is shared: count only the shapes this call adds
    ours = minilm.encode(texts, batch_size=128)
    ref = st_minilm.encode(texts, batch_size=128, convert_to_numpy=True)
    assert ours.dtype == np.float32 and ours.shape == (2759, 384)
    diff = np.abs(ours - ref).max()
    assert diff <= 1e-5, diff
    # at most one compilation per length bucket, never one per batch (22 batches here)
    from embedjax.tokenize import bucket_lengths
    assert len(minilm._compiled - before) <= len(bucket_lengths(256))
    assert {shape[0] for shape in minilm._compiled - before} <= {128}


def test_truncation_warns_once(minilm, st_minilm, caplog):
    texts = [_long_text(), "short", _long_text() + " more"]
    with caplog.at_level(logging.WARNING, logger="embedjax.encoder"):
        ours = minilm.encode(texts)
    msgs = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert msgs == ["2 of 3 texts were longer than 256 tokens and were truncated"]
    np.testing.assert_allclose(ours, st_minilm.encode(texts), atol=1e-5)


def test_odd_inputs(minilm, st_minilm):
    assert minilm.encode([]).shape == (0, 384)
    assert minilm.encode([], dim=64).shape == (0, 64)
    texts = ["", "   ", "\t\n", "naïve café — 東京 🙂", "Ünïcödé"]
    ours = minilm.encode(texts)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, st_minilm.encode(texts), atol=1e-5)


def test_matryoshka_dim_truncates_and_renormalises(minilm):
    full = minilm.encode(["a sentence about cats", "another"])
    short = minilm.encode(["a sentence about cats", "another"], dim=64)
    assert short.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-6)
    expected = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(short, expected, atol=1e-6)
    raw = minilm.encode(["a sentence about cats"], normalize=False)
    assert abs(np.linalg.norm(raw) - 1.0) > 1e-3  # MiniLM's pooled output is not unit length


def test_prompt_is_prepended(minilm):
    a = minilm.encode(["query: what is jax"])
    b = minilm.encode(["what is jax"], prompt="query: ")
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_batch_size_does_not_change_results(minilm, stsb_test_sentences):
    texts = stsb_test_sentences[:40]
    np.testing.assert_allclose(minilm.encode(texts, batch_size=7), minilm.encode(texts, batch_size=64), atol=2e-6)
