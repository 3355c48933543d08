"""The exported SavedModel against the JAX encoder: embeddings, in-graph token ids, bucketing, bad input,
parameters stored as variables, role signatures, export errors."""
import json

import numpy as np
import pytest
import tensorflow as tf

from embedjax.export.saved_model import ExportError, SavedModelEncoder, export_saved_model
from embedjax.tokenize import bucket_for, bucket_lengths

TOL = 1e-4

EDGE_TEXTS = [
    "",                                              # empty string: just [CLS] [SEP]
    "   \t ",                                        # whitespace only
    "naïve café résumé Ångström — “quotes” 日本語 😀",
    "COVID-19 mRNA vaccines showed ~95% efficacy (n=43,548).",
    "word " * 4000,                                  # very long: truncated to the model's 256 tokens
    "x" * 100_000,                                   # one 100k-character "word"
]


def _hf_ids(tokenizer, texts, max_length):
    enc = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_length)
    return enc["input_ids"]


def _check_ids(sm, tokenizer, texts, max_length, pad_id=0):
    ids, mask = sm.tokenize(texts)
    want = _hf_ids(tokenizer, texts, max_length)
    longest = max(len(w) for w in want)
    assert ids.shape == (len(texts), bucket_for(longest, bucket_lengths(max_length)))
    for i, w in enumerate(want):
        n = int(mask[i].sum())
        assert ids[i, :n].tolist() == list(w), (i, texts[i][:80])
        assert (ids[i, n:] == pad_id).all() and (mask[i, n:] == 0).all() and (mask[i, :n] == 1).all()


@pytest.mark.parametrize("sample", ["stsb", "edge"])
def test_minilm_sample_matches_jax(minilm, minilm_sm, stsb_test_sentences, sample):
    texts = stsb_test_sentences[::29] if sample == "stsb" else EDGE_TEXTS
    got = minilm_sm.encode(texts, batch_size=32)
    want = minilm.encode(texts)
    assert got.shape == want.shape == (len(texts), 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # the model normalises
    _check_ids(minilm_sm, minilm.tokenizer, texts, minilm.max_length)


def test_bucketing_pads_to_the_smallest_bucket(minilm, minilm_sm):
    buckets = bucket_lengths(minilm.max_length)
    assert minilm_sm.metadata["length_buckets"] == list(buckets)
    for n_words in (1, 20, 40, 100, 300):
        ids, _ = minilm_sm.tokenize(["a " * n_words, "b"])
        n_tokens = len(_hf_ids(minilm.tokenizer, ["a " * n_words], minilm.max_length)[0])
        assert ids.shape[1] == bucket_for(n_tokens, buckets), n_words


def test_matryoshka_output_matches_encoder_dim(minilm, minilm_sm, stsb_test_sentences):
    texts = stsb_test_sentences[:40]
    out = minilm_sm(texts)
    assert sorted(out) == ["embedding", "embedding_128"]
    np.testing.assert_allclose(out["embedding_128"], minilm.encode(texts, dim=128), atol=TOL, rtol=0)


def test_bad_input_gives_embeddings_or_a_clear_tf_error(minilm, minilm_sm):
    fn = minilm_sm.model.signatures["serving_default"]
    # empty batch -> [0, D] for every output
    out = fn(text=tf.constant([], tf.string))
    assert out["embedding"].shape == (0, 384) and out["embedding_128"].shape == (0, 128)
    # invalid UTF-8 bytes are replaced by U+FFFD, as bytes.decode("utf-8", "replace") does in Python
    raw = [b"caf\xc3 au lait \xff\xfe", b"\x80 plain \xe2\x82"]
    got = fn(text=tf.constant(raw))["embedding"].numpy()
    want = minilm.encode([r.decode("utf-8", "replace") for r in raw])
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    # a non-string batch is refused by the signature itself
    with pytest.raises(tf.errors.InvalidArgumentError, match="string"):
        fn(text=tf.constant([1, 2]))
    # TF Serving does not check shapes: a scalar or a matrix of strings is read row-major as a batch
    np.testing.assert_allclose(fn(text=tf.constant("one text"))["embedding"].numpy(),
                               minilm.encode(["one text"]), atol=TOL, rtol=0)
    np.testing.assert_allclose(fn(text=tf.constant([["a b", "c"], ["d", "e f g"]]))["embedding"].numpy(),
                               minilm.encode(["a b", "c", "d", "e f g"]), atol=TOL, rtol=0)
    # and the model still answers afterwards
    np.testing.assert_allclose(fn(text=tf.constant(["still alive"]))["embedding"].numpy(),
                               minilm.encode(["still alive"]), atol=TOL, rtol=0)


def test_params_are_variables_not_constants(minilm, minilm_export, minilm_sm):
    import jax

    leaves = jax.tree.leaves(minilm.params)
    param_bytes = sum(np.asarray(x).nbytes for x in leaves)
    variables = minilm_sm.model.param_variables
    assert len(variables) == len(leaves)
    assert sum(v.numpy().nbytes for v in variables) == param_bytes
    assert all(not v.trainable for v in variables)
    graph_bytes = (minilm_export / "saved_model.pb").stat().st_size
    var_bytes = sum(f.stat().st_size for f in (minilm_export / "variables").iterdir())
    assert var_bytes >= param_bytes and graph_bytes < 0.1 * param_bytes, (graph_bytes, var_bytes)


def test_metadata_describes_the_export(minilm_export):
    meta = json.loads((minilm_export / "assets.extra" / "embedjax_export.json").read_text())
    assert meta["embedding_dim"] == 384 and meta["normalized"] is True and meta["max_length"] == 256
    assert meta["platforms"] == ["cpu"] and meta["outputs"] == ["embedding", "embedding_128"]
    assert list(meta["signatures"]) == ["serving_default"]  # MiniLM has no prompts and one tower
    assert meta["tokenizer"]["kind"] == "wordpiece"


def test_role_signatures_prompts_and_matryoshka(tiny_enc, tiny_sm):
    assert set(tiny_sm.signatures) == {"serving_default", "query", "document", "tokenize"}
    texts = ["what is a plane?", "A plane is taking off.", ""]
    out = tiny_sm(texts)
    assert sorted(out) == ["embedding", "embedding_16", "embedding_8"]
    np.testing.assert_allclose(out["embedding"], tiny_enc.encode(texts), atol=TOL, rtol=0)
    for d in (16, 8):
        np.testing.assert_allclose(out[f"embedding_{d}"], tiny_enc.encode(texts, dim=d), atol=TOL, rtol=0)
    q = tiny_sm.encode(texts, signature="query")
    d = tiny_sm.encode(texts, signature="document")
    np.testing.assert_allclose(q, tiny_enc.encode(texts, prompt="query: "), atol=TOL, rtol=0)
    np.testing.assert_allclose(d, tiny_enc.encode(texts, prompt="passage: "), atol=TOL, rtol=0)
    assert np.abs(q - d).max() > 1e-3  # the prompts really are applied


def test_separate_towers(tmp_path, minilm):
    import dataclasses

    import jax

    from embedjax import Encoder
    from embedjax.models.bert import BertConfig
    from embedjax.models.dual_encoder import HeadConfig, ModelConfig, init_params

    cfg = ModelConfig("bert", BertConfig(vocab_size=minilm.config.encoder.vocab_size, hidden_size=16,
                                         num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
                      HeadConfig(pooling="cls", normalize=False), shared_towers=False, max_length=32)
    enc = Encoder(cfg, init_params(cfg, jax.random.key(1)), minilm.tokenizer, name="two-towers")
    path = export_saved_model(enc, tmp_path / "1", show_progress=False, warmup_batch_sizes=(1,))
    sm = SavedModelEncoder(path)
    assert set(sm.signatures) == {"serving_default", "query", "document", "tokenize"}
    texts = ["first text", "a second, longer text than the first one"]
    q, d = sm.encode(texts, signature="query"), sm.encode(texts, signature="document")
    np.testing.assert_allclose(q, enc.encode(texts, tower="query"), atol=TOL, rtol=0)
    np.testing.assert_allclose(d, enc.encode(texts, tower="document"), atol=TOL, rtol=0)
    np.testing.assert_allclose(sm.encode(texts), q, atol=0, rtol=0)  # serving_default is the query tower
    assert np.abs(q - d).max() > 1e-3
    assert not np.allclose(np.linalg.norm(q, axis=1), 1.0)  # normalize=False is respected
    assert dataclasses.replace(cfg).shared_towers is False


def test_export_errors_are_clear(tmp_path, tiny_enc, tiny_bert_dir):
    with pytest.raises(ExportError, match="platforms: unknown"):
        export_saved_model(tiny_enc, tmp_path / "a" / "1", platforms="cpu,gpu")
    with pytest.raises(ExportError, match=r"matryoshka_dims \[32\]"):
        export_saved_model(tiny_enc, tmp_path / "b" / "1", matryoshka_dims=(32,))
    with pytest.raises(ExportError, match="exceeds the model's 128"):
        export_saved_model(tiny_enc, tmp_path / "c" / "1", max_length=512)
    (tmp_path / "d" / "1").mkdir(parents=True)
    (tmp_path / "d" / "1" / "saved_model.pb").write_bytes(b"old")
    with pytest.raises(ExportError, match="already exists"):
        export_saved_model(tiny_bert_dir, tmp_path / "d" / "1")
    assert (tmp_path / "d" / "1" / "saved_model.pb").read_bytes() == b"old"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["1"]  # no temp folder left behind


def _xla_call_module_platforms(export) -> set[tuple[str, ...]]:
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel.FromString((export / "saved_model.pb").read_bytes())
    lib = sm.meta_graphs[0].graph_def.library
    return {tuple(p.decode() for p in n.attr["platforms"].list.s)
            for f in lib.function for n in f.node_def if n.op == "XlaCallModule"}


def test_minilm_is_serialized_for_cpu(minilm_export):
    assert _xla_call_module_platforms(minilm_export) == {("CPU",)}


def test_overwrite_and_multi_platform_export(tmp_path, tiny_bert_dir, tiny_enc):
    out = tmp_path / "base" / "7"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("old")
    export_saved_model(tiny_bert_dir, out, overwrite=True, max_length=32, warmup_batch_sizes=(2,),
                       platforms="cpu,cuda,tpu", show_progress=False)
    assert not (out / "stale.txt").exists() and (out / "saved_model.pb").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["7"]
    # one StableHLO module per bucket, lowered for all three platforms; the CPU one runs here
    assert _xla_call_module_platforms(out) == {("CPU", "CUDA", "TPU")}
    sm = SavedModelEncoder(out)
    assert sm.metadata["length_buckets"] == [16, 32] and sm.metadata["platforms"] == ["cpu", "cuda", "tpu"]
    np.testing.assert_allclose(sm.encode(["short"]), tiny_enc.encode(["short"], max_length=32),
                               atol=TOL, rtol=0)
