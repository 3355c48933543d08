"""2D Matryoshka: the states after fewer layers (one forward pass, `exit_layers`) are exactly what the model cut
to that many layers computes (`truncate_layers`, `Encoder.truncated`, `encode(layers=...)`), for every encoder
family; the 2D loss is the full loss plus each sub-network's, also with gradient caching; configs that ask for
what the model cannot give are refused."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from embedjax.models.bert import BertConfig
from embedjax.models.dual_encoder import (DualEncoder, HeadConfig, ModelConfig, init_params, split_exits,
                                          truncate_layers)
from embedjax.models.modernbert import ModernBertConfig
from embedjax.models.t5 import T5Config

ENCODERS = {
    "bert": BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=64),
    "t5": T5Config(vocab_size=120, d_model=32, d_kv=8, d_ff=64, num_layers=4, num_heads=4,
                   feed_forward_proj="gated-gelu"),
    "modernbert": ModernBertConfig(vocab_size=120, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                   num_attention_heads=4, local_attention=4, global_attn_every_n_layers=2,
                                   pad_token_id=0),
}


def _cfg(arch, **head):
    return ModelConfig(arch, ENCODERS[arch], HeadConfig(**{"pooling": "mean", "normalize": True, **head}),
                       max_length=32)


def _inputs(B=3, L=12):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 120, (B, L)).astype(np.int32)
    mask = (np.arange(L)[None] < np.array([[L], [5], [9]][:B])).astype(np.int32)
    return ids, mask


@pytest.mark.parametrize("arch", sorted(ENCODERS))
def test_exit_states_equal_the_truncated_model(arch):
    cfg = _cfg(arch, projection_dim=16)
    params = init_params(cfg, jax.random.key(1))
    ids, mask = _inputs()
    both = DualEncoder(cfg).apply({"params": params}, ids, mask, exit_layers=(1, 3))
    assert both.shape == (3, 3 * 16)
    full, after1, after3 = split_exits(both, 2)
    np.testing.assert_allclose(full, DualEncoder(cfg).apply({"params": params}, ids, mask), atol=1e-6)
    for n, part in ((1, after1), (3, after3)):
        sub_cfg, sub_params = truncate_layers(cfg, params, n)
        assert len([k for k in sub_params["tower"]["encoder"] if k.startswith("layer_")]) == n
        want = DualEncoder(sub_cfg).apply({"params": sub_params}, ids, mask)
        np.testing.assert_allclose(part, want, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(part, axis=-1), 1.0, atol=1e-5)
        assert np.abs(np.asarray(part) - np.asarray(full)).max() > 1e-3   # a different network, not a copy


def test_scanned_layers_truncate_and_refuse_exits():
    cfg = _cfg("bert")
    scan = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, scan_layers=True))
    params = init_params(cfg, jax.random.key(1))
    from embedjax.models.layers import stack_layers
    scan_params = {"tower": dict(params["tower"], encoder=stack_layers(params["tower"]["encoder"]))}
    ids, mask = _inputs()
    sub_cfg, sub = truncate_layers(scan, scan_params, 2)
    assert jax.tree.leaves(sub["tower"]["encoder"]["layers"])[0].shape[0] == 2
    plain_cfg, plain = truncate_layers(cfg, params, 2)
    np.testing.assert_allclose(DualEncoder(sub_cfg).apply({"params": sub}, ids, mask),
                               DualEncoder(plain_cfg).apply({"params": plain}, ids, mask), atol=1e-6)
    with pytest.raises(ValueError, match="scan_layers"):
        DualEncoder(scan).apply({"params": scan_params}, ids, mask, exit_layers=(2,))
    with pytest.raises(ValueError, match=r"exit layers must be increasing layer counts in \[1, 3\]"):
        DualEncoder(cfg).apply({"params": params}, ids, mask, exit_layers=(4,))
    with pytest.raises(ValueError, match=r"layers must be in \[1, 4\]"):
        truncate_layers(cfg, params, 5)


def test_encoder_encode_layers(tiny_bert_dir):
    from embedjax import Encoder

    enc = Encoder.load(tiny_bert_dir)
    texts = ["a short one", "a somewhat longer sentence about nothing in particular", "x"]
    n = enc.num_layers
    sub = enc.truncated(1)
    assert sub.num_layers == 1 and enc.truncated(1) is sub and enc.truncated(n) is enc
    got = enc.encode(texts, layers=1, dim=16)
    np.testing.assert_array_equal(got, sub.encode(texts, dim=16))
    ids = np.zeros((1, 8), np.int32)
    both = DualEncoder(enc.config).apply({"params": enc.params}, ids, np.ones_like(ids), exit_layers=(1,))
    np.testing.assert_allclose(split_exits(both, 1)[1], sub._module.apply({"params": sub.params}, ids,
                                                                          np.ones_like(ids)), atol=1e-6)
    codes = enc.encode(texts, layers=1, precision="ubinary")
    assert codes.shape == (3, enc.dim // 8) and codes.dtype == np.uint8
    # the sub-network saves as a model of its own, which loads back with that many layers
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        back = Encoder.load(sub.save(d))
        assert back.num_layers == 1
        np.testing.assert_allclose(back.encode(texts), sub.encode(texts), atol=1e-6)


def _step_inputs(arch, loss, grad_cache=0):
    from embedjax import sharding
    from embedjax.objectives import make_objective
    from embedjax.train_step import create_train_state, make_loss_and_grads

    cfg = _cfg(arch)
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    objective, lp = make_objective(loss)
    state, _ = create_train_state(cfg, lp, optax.sgd(1.0), mesh, jax.random.key(0))
    rng = np.random.default_rng(0)
    B, L = 8, 12
    batch = {"query_ids": rng.integers(1, 120, (B, L)), "positive_ids": rng.integers(1, 120, (B, L)),
             "query_mask": (np.arange(L)[None] < rng.integers(3, L + 1, (B, 1))),
             "positive_mask": (np.arange(L)[None] < rng.integers(3, L + 1, (B, 1)))}
    batch = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}
    layers = tuple(loss.get("matryoshka_layers", ()))
    fn = jax.jit(make_loss_and_grads(cfg, objective, grad_cache_chunks=grad_cache, exit_layers=layers),
                 compiler_options={"xla_backend_optimization_level": 0})  # compile fast; same math
    with jax.set_mesh(mesh):
        loss_v, metrics, grads = fn(state.params, batch)
    return cfg, state, batch, float(loss_v), {k: float(v) for k, v in metrics.items()}, grads


def test_two_d_loss_is_the_sum_over_sub_networks_and_grad_cache_agrees():
    from embedjax.objectives import make_objective

    base = {"name": "in_batch_softmax", "temperature": 0.05, "matryoshka_dims": (32, 8)}
    loss2d = dict(base, matryoshka_layers=(1, 2), matryoshka_layer_weights=(0.5, 2.0))
    cfg, state, batch, total, metrics, grads = _step_inputs("bert", loss2d)
    # the same sum from the truncated models, each through the plain (1D Matryoshka) objective
    objective, _ = make_objective(base)
    params = state.params["model"]

    def plain_loss(c, p):
        def emb(prefix):
            return DualEncoder(c).apply({"params": p}, batch[f"{prefix}_ids"], batch[f"{prefix}_mask"])
        return float(objective({"query": emb("query"), "document": emb("positive")}, {}, batch)[0])
    want = {n: plain_loss(*truncate_layers(cfg, params, n)) for n in (1, 2, 4)}
    assert metrics["loss_layers1"] == pytest.approx(want[1], rel=1e-5)
    assert metrics["loss_layers2"] == pytest.approx(want[2], rel=1e-5)
    assert total == pytest.approx(want[4] + 0.5 * want[1] + 2.0 * want[2], rel=1e-5)
    # gradient caching: same loss and gradients
    _, _, _, total_c, _, grads_c = _step_inputs("bert", loss2d, grad_cache=2)
    assert total_c == pytest.approx(total, rel=1e-5)
    for a, b in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, atol=2e-5 * max(1.0, float(np.abs(b).max())))


def test_config_refuses_what_the_model_cannot_do(tmp_path):
    from embedjax.config import ConfigError, base_config, check_model_fit, validate

    c = base_config()
    c.model_config = _cfg("bert").to_dict()
    c.loss.matryoshka_layers = (3, 1)
    with pytest.raises(ConfigError, match="loss.matryoshka_layers must be increasing"):
        validate(c)
    c.loss.matryoshka_layers = (1,)
    c.loss.matryoshka_layer_weights = (1.0, 2.0)
    with pytest.raises(ConfigError, match="matryoshka_layer_weights has 2 weights for 1"):
        validate(c)
    c.loss.matryoshka_layer_weights = ()
    c.loss.matryoshka_layers = (4,)
    with pytest.raises(ConfigError, match="below the model's 4 layers"):
        check_model_fit(c, _cfg("bert"))
    c.loss.matryoshka_layers = (2,)
    scan = _cfg("bert")
    scan = dataclasses.replace(scan, encoder=dataclasses.replace(scan.encoder, scan_layers=True))
    with pytest.raises(ConfigError, match="scan_layers=False"):
        check_model_fit(c, scan)
    check_model_fit(c, _cfg("bert"))
