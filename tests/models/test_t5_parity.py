"""Tiny random T5 encoders (v1.0 ReLU and v1.1 gated GELU) built with transformers' PyTorch T5EncoderModel
agree with embedjax's T5 encoder after loading the saved safetensors."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("ff", ["relu", "gated-gelu"])
def test_t5_hidden_states_match(tmp_path, ff):
    from embedjax.models.convert import load_folder
    from embedjax.models.t5 import T5Encoder

    torch.manual_seed(0)
    hf_cfg = transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4,
                                   relative_attention_num_buckets=32, relative_attention_max_distance=20,
                                   feed_forward_proj=ff, dropout_rate=0.0)
    model = transformers.T5EncoderModel(hf_cfg).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()

    rng = np.random.default_rng(0)
    ids = rng.integers(2, 128, size=(3, 40)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 25:] = 0          # padding present
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()

    cfg, params, _, _ = load_folder(tmp_path)
    assert cfg.architecture == "t5" and cfg.encoder.is_gated == (ff == "gated-gelu")
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
