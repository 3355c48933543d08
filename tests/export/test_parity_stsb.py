"""Parity on all 2758 STS-B test sentences (s1 and s2): the SavedModel's embeddings equal embedjax's JAX
embeddings within 1e-4 and its in-graph token ids equal the Python tokenizer's, for all-MiniLM-L6-v2 and for
a tiny Sentence-T5 trained a few steps (SentencePiece vocabulary); STS-B Spearman through the SavedModel
equals the JAX value."""
import json

import numpy as np
import pytest

from embedjax.tokenize import bucket_for, bucket_lengths

TOL = 1e-4


def _assert_ids_equal(sm, tokenizer, texts, max_length, batch=256):
    buckets = bucket_lengths(max_length)
    enc = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_length)
    want = enc["input_ids"]
    bad = []
    for s in range(0, len(texts), batch):
        ids, mask = sm.tokenize(texts[s:s + batch])
        w = want[s:s + batch]
        assert ids.shape[1] == bucket_for(max(len(x) for x in w), buckets)
        for i, row in enumerate(w):
            n = int(mask[i].sum())
            if n != len(row) or ids[i, :n].tolist() != list(row):
                bad.append((s + i, texts[s + i][:60]))
    assert not bad, f"{len(bad)} of {len(texts)} texts tokenised differently, e.g. {bad[:3]}"


@pytest.mark.slow
def test_minilm_stsb_parity_and_spearman(minilm, minilm_sm, stsb_test_sentences, stsb_minilm_jax,
                                         stsb_minilm_saved_model):
    from embedjax.evaluate import STSEvaluator
    from embedjax.evaluate.sts import resolve_sts_path

    assert len(stsb_test_sentences) == 2758
    np.testing.assert_allclose(stsb_minilm_saved_model, stsb_minilm_jax, atol=TOL, rtol=0)
    _assert_ids_equal(minilm_sm, minilm.tokenizer, stsb_test_sentences, minilm.max_length)

    lookup = {"jax": dict(zip(stsb_test_sentences, stsb_minilm_jax)),
              "saved_model": dict(zip(stsb_test_sentences, stsb_minilm_saved_model))}
    ev = STSEvaluator.from_file(resolve_sts_path(_stsb_dir(), "test"), show_progress=False)
    scores = {k: ev.run(lambda texts, role, t=t: np.stack([t[x] for x in texts]))["spearman"]
              for k, t in lookup.items()}
    assert abs(scores["saved_model"] - scores["jax"]) < 1e-4, scores
    assert round(100 * scores["saved_model"], 2) == 82.03, scores  # the published all-MiniLM-L6-v2 number


def _stsb_dir():
    from pathlib import Path
    return Path(__file__).resolve().parents[2] / "embedjax" / "data" / "shipped" / "stsb"


@pytest.mark.slow
def test_t5_workdir_stsb_parity(t5_workdir, t5_export, stsb_test_sentences):
    from embedjax import Encoder
    from embedjax.export.saved_model import SavedModelEncoder
    from embedjax.export.source import format_text, load_source

    sm = SavedModelEncoder(t5_export)
    meta = sm.metadata
    assert meta["architecture"] == "t5" and meta["tokenizer"]["kind"] == "sentencepiece"
    assert meta["checkpoint_step"] == 3 and meta["max_length"] == 64
    assert set(sm.signatures) == {"serving_default", "query", "document", "tokenize"}  # trained with prompts

    final = Encoder.load(t5_workdir / "final")      # the JAX reference: the trainer's own final model
    got = sm.encode(stsb_test_sentences)
    want = final.encode(stsb_test_sentences)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    src = load_source(t5_workdir)
    _assert_ids_equal(sm, src.tokenizer, stsb_test_sentences, 64)
    # the role signatures format texts as training did (Prompt templates "query: {text}" / "passage: {doc}")
    sample = stsb_test_sentences[::11]
    for role in ("query", "document"):
        formatted = [format_text(src.query_prompt, role, t) for t in sample]
        assert all(f.startswith("query: " if role == "query" else "passage: ") for f in formatted)
        np.testing.assert_allclose(sm.encode(sample, signature=role), final.encode(formatted),
                                   atol=TOL, rtol=0)


@pytest.mark.slow
def test_t5_workdir_to_sentence_transformers(t5_workdir, tmp_path, stsb_test_sentences):
    from embedjax import Encoder
    from embedjax.export.sentence_transformers import export_sentence_transformers

    out = export_sentence_transformers(t5_workdir, tmp_path / "st")          # from the latest checkpoint
    st_cfg = json.loads((out / "config_sentence_transformers.json").read_text())
    assert st_cfg["prompts"] == {"query": "query: ", "document": "passage: "}
    assert (out / "spiece.model").is_file()
    texts = stsb_test_sentences[:64]
    want = Encoder.load(t5_workdir / "final").encode(texts)
    np.testing.assert_allclose(Encoder.load(out).encode(texts), want, atol=1e-6, rtol=0)
