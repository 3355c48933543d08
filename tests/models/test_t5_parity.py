"""Tiny random T5 encoders (v1.0 ReLU and v1.1 gated GELU) built with transformers' PyTorch T5EncoderModel
agree with embedjax's T5 encoder after loading the saved safetensors."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("ff", ["relu", "gated-gelu", "t5-v1.0-config", "mt5-config"])
def test_t5_hidden_states_match(tmp_path, ff):
    """'t5-v1.0-config': a ReLU model whose config.json has no feed_forward_proj, as t5-small ... t5-11b ship
    (Sentence-T5 and GTR start from them): transformers reads that as ReLU, so must embedjax. 'mt5-config': an
    MT5 config without the key (gated GELU by MT5Config's default)."""
    import json

    from embedjax.models.convert import load_folder
    from embedjax.models.t5 import T5Encoder

    torch.manual_seed(0)
    mt5 = ff == "mt5-config"
    proj = {"t5-v1.0-config": "relu", "mt5-config": "gated-gelu"}.get(ff, ff)
    cls = (transformers.MT5Config, transformers.MT5EncoderModel) if mt5 else (transformers.T5Config,
                                                                           transformers.T5EncoderModel)
    hf_cfg = cls[0](vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4,
                    relative_attention_num_buckets=32, relative_attention_max_distance=20,
                    feed_forward_proj=proj, dropout_rate=0.0)
    model = cls[1](hf_cfg).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    if ff in ("t5-v1.0-config", "mt5-config"):   # the published config.json files have none of these keys
        c = json.loads((tmp_path / "config.json").read_text())
        for k in ("feed_forward_proj", "dense_act_fn", "is_gated_act"):
            c.pop(k, None)
        (tmp_path / "config.json").write_text(json.dumps(c))
        assert getattr(cls[0].from_pretrained(tmp_path), "feed_forward_proj") == proj   # transformers' reading

    rng = np.random.default_rng(0)
    ids = rng.integers(2, 128, size=(3, 40)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 25:] = 0          # padding present
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()

    cfg, params, _, _ = load_folder(tmp_path)
    assert cfg.architecture == "t5" and cfg.encoder.is_gated == (proj == "gated-gelu")
    ours = np.asarray(T5Encoder(cfg.encoder).apply({"params": params["tower"]["encoder"]},
                                                   ids.astype(np.int32), mask.astype(np.int32)))
    valid = mask.astype(bool)
    assert np.abs(ours[valid] - ref[valid]).max() <= 1e-5
    assert np.abs(ours - ref).max() <= 1e-5   # padded positions too


def test_relative_position_buckets_match_hf():
    from transformers.models.t5.modeling_t5 import T5Attention

    from embedjax.models.t5 import relative_position_buckets

    L = 300
    rel = torch.arange(L)[None, :] - torch.arange(L)[:, None]
    for nb, md in ((32, 128), (32, 20), (64, 256)):
        ref = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=nb, max_distance=md)
        np.testing.assert_array_equal(relative_position_buckets(L, L, nb, md), ref.numpy())
