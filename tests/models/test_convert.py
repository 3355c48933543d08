"""Weights in and out: sentence-transformers round trip, T5 + projection, and clear errors for bad folders."""
import json
import shutil

import numpy as np
import pytest


def test_round_trip_minilm_to_sentence_transformers(minilm, tmp_path, stsb_test_sentences):
    st = pytest.importorskip("sentence_transformers")
    out = minilm.save(tmp_path / "st")
    texts = stsb_test_sentences[:200]
    ref = st.SentenceTransformer(str(out), device="cpu").encode(texts)
    np.testing.assert_allclose(minilm.encode(texts), ref, atol=1e-5)
    # and back into embedjax, bit for bit
    from embedjax import Encoder
    again = Encoder.load(out)
    assert again.fingerprint == minilm.fingerprint


def test_sentence_transformers_6x_folder_loads(st_minilm, minilm, tmp_path, stsb_test_sentences):
    """all-MiniLM-L6-v2 re-saved by the installed sentence-transformers (6.x: `pooling_mode`, `include_prompt`,
    module types under sentence_transformers.sentence_transformer / base) loads and encodes as it does."""
    import jax

    from embedjax import Encoder

    folder = tmp_path / "st6"
    st_minilm.save(str(folder))
    pool = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert pool.get("pooling_mode") == "mean" and "pooling_mode_mean_tokens" not in pool, pool
    enc = Encoder.load(folder)
    assert enc.max_length == 256        # 6.x keeps max_seq_length as the tokenizer's model_max_length
    texts = stsb_test_sentences[:64] + [" ".join(stsb_test_sentences[:40])]   # and one text past it
    np.testing.assert_allclose(enc.encode(texts), st_minilm.encode(texts), atol=1e-5)
    for a, b in zip(jax.tree.leaves(enc.params), jax.tree.leaves(minilm.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pooling_config_layouts(tmp_path):
    from embedjax.models.convert import ModelLoadError, _pooling_from_st

    assert _pooling_from_st({"pooling_mode_mean_tokens": True}, tmp_path) == "mean"
    assert _pooling_from_st({"pooling_mode": "cls", "include_prompt": True}, tmp_path) == "cls"
    assert _pooling_from_st({"pooling_mode": ["mean_sqrt_len_tokens"]}, tmp_path) == "mean_sqrt_len"
    assert _pooling_from_st({"pooling_mode": "lasttoken"}, tmp_path) == "lasttoken"
    assert _pooling_from_st({"pooling_mode_lasttoken": True, "pooling_mode_mean_tokens": False}, tmp_path) == "lasttoken"
    with pytest.raises(ModelLoadError, match=r"pooling 'weightedmean' is not supported"):
        _pooling_from_st({"pooling_mode": "weightedmean"}, tmp_path)
    with pytest.raises(ModelLoadError, match=r"pooling \('cls', 'mean'\) is not supported"):
        _pooling_from_st({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}, tmp_path)
    with pytest.raises(ModelLoadError, match="include_prompt=false"):
        _pooling_from_st({"pooling_mode": "mean", "include_prompt": False}, tmp_path)


def test_round_trip_sentence_t5_layout(tmp_path, minilm_dir):
    """A T5 encoder + bias-free 2_Dense projection + Normalize (Sentence-T5 layout) survives the round trip."""
    st = pytest.importorskip("sentence_transformers")
    pytest.importorskip("sentencepiece")
    import jax
    from transformers import T5TokenizerFast

    from embedjax import Encoder
    from embedjax.models.dual_encoder import HeadConfig, ModelConfig, init_params
    from embedjax.models.t5 import T5Config

    from _spm import make_spm_tokenizer_dir

    tdir = make_spm_tokenizer_dir(tmp_path, vocab_size=48, lines=[
        "the quick brown fox jumps over the lazy dog", "a tiny sentence t5 model", "hello world",
        "padding matters here, a longer sentence than the rest", "embeddings for retrieval and similarity"] * 20)
    tok = T5TokenizerFast.from_pretrained(str(tdir))
    assert tok("hello world")["input_ids"][:-1] != [tok.unk_token_id] * (len(tok("hello world")["input_ids"]) - 1)
    cfg = ModelConfig("t5", T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                     feed_forward_proj="gated-gelu"),
                      HeadConfig(pooling="mean", projection_dim=16, projection_bias=False, normalize=True),
                      max_length=64)
    enc = Encoder(cfg, init_params(cfg, jax.random.key(1)), tok, name="tiny-st5")
    out = enc.save(tmp_path / "st5")
    texts = ["a tiny sentence t5", "hello world", "", "padding matters here, a longer sentence than the rest"]
    ref = st.SentenceTransformer(str(out), device="cpu").encode(texts)
    ours = enc.encode(texts)
    assert ours.shape == (4, 16)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    np.testing.assert_allclose(Encoder.load(out).encode(texts), ours, atol=1e-6)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_weights_file_is_named(minilm_dir, tmp_path):
    from embedjax import Encoder
    from embedjax.models.convert import ModelLoadError

    d = _copy(minilm_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: missing"):
        Encoder.load(d)


def test_corrupt_weights_file_is_named(minilm_dir, tmp_path):
    from embedjax import Encoder
    from embedjax.models.convert import ModelLoadError

    d = _copy(minilm_dir, tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: cannot be read"):
        Encoder.load(d)


def test_corrupt_config_is_named(minilm_dir, tmp_path):
    from embedjax import Encoder
    from embedjax.models.convert import ModelLoadError

    d = _copy(minilm_dir, tmp_path / "m")
    (d / "1_Pooling" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"1_Pooling/config\.json: not valid JSON"):
        Encoder.load(d)


def test_unknown_architecture_lists_supported(minilm_dir, tmp_path):
    from embedjax import Encoder
    from embedjax.models.convert import ModelLoadError

    d = _copy(minilm_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"model_type 'gpt2' is not supported; supported: bert, roberta, xlm-roberta, mpnet, modernbert, t5, mt5"):
        Encoder.load(d)


def test_weights_not_matching_config(minilm_dir, tmp_path):
    from embedjax import Encoder
    from embedjax.models.convert import ModelLoadError

    d = _copy(minilm_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 8
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"weights missing .* does not match config\.json"):
        Encoder.load(d)


def test_offline_hub_id_fails_clearly(monkeypatch):
    from embedjax import Encoder
    from embedjax.models.convert import ModelLoadError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="could not be fetched from the Hugging Face hub"):
        Encoder.load("some-org/some-model-that-is-not-cached")
    with pytest.raises(ModelLoadError, match="no such model folder"):
        Encoder.load("./does/not/exist")


def test_every_param_has_logical_axes():
    import jax
    import jax.numpy as jnp
    import flax.linen as nn

    from embedjax.models.bert import BertConfig
    from embedjax.models.dual_encoder import DualEncoder, HeadConfig, ModelConfig
    from embedjax.models.t5 import T5Config

    for cfg in (ModelConfig("bert", BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=32)),
                ModelConfig("t5", T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2),
                            HeadConfig(projection_dim=8), shared_towers=False)):
        ids = jnp.zeros((1, 4), jnp.int32)
        variables = jax.eval_shape(lambda: DualEncoder(cfg).init(jax.random.key(0), ids, ids + 1,
                                                                 method=DualEncoder.init_both))
        leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
        assert all(len(x.names) == x.value.ndim for x in leaves)
        if not cfg.shared_towers:
            assert set(variables["params"]) == {"query_tower", "document_tower"}
