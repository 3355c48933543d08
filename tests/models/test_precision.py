"""How encoders run in training: rematerialisation (same values and gradients, fewer kept activations), dropout
(only in a training step given a "dropout" rng; deterministic in evaluation, encoding and export) and bfloat16
compute (close to float32, float32 out), for every architecture; and the config keys that set them."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from embedjax.config import ConfigError, base_config, validate
from embedjax.models.bert import BertConfig
from embedjax.models.dual_encoder import DualEncoder, HeadConfig, ModelConfig, init_params
from embedjax.models.modernbert import ModernBertConfig
from embedjax.models.source import with_runtime
from embedjax.models.t5 import T5Config
from embedjax.objectives import make_objective
from embedjax.train_step import create_train_state, make_loss_and_grads, make_train_step
from embedjax import sharding

ENCODERS = {
    "bert": BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=64),
    "t5": T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
    "modernbert": ModernBertConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, local_attention=8, pad_token_id=0),
}


def _cfg(arch, **runtime):
    return ModelConfig(arch, dataclasses.replace(ENCODERS[arch], **runtime), HeadConfig(pooling="mean"),
                       max_length=32)


def _inputs(B=4, L=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(1, 100, (B, L)), jnp.int32)
    mask = jnp.asarray((np.arange(L)[None] < rng.integers(3, L + 1, (B, 1))).astype(np.int32))
    return ids, mask


def _loss(cfg, params, ids, mask, rngs=None):
    out = DualEncoder(cfg).apply({"params": params}, ids, mask, rngs=rngs or {})
    return jnp.sum(out * jnp.linspace(-1.0, 1.0, out.size).reshape(out.shape)), out


@pytest.mark.parametrize("arch", list(ENCODERS))
@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_same_values_and_gradients(arch, policy):
    base, remat = _cfg(arch), _cfg(arch, remat=policy)
    params = init_params(base, jax.random.key(0))
    assert jax.tree.structure(params) == jax.tree.structure(init_params(remat, jax.random.key(0)))  # same names
    ids, mask = _inputs()
    grad = lambda c: jax.jit(jax.value_and_grad(lambda p: _loss(c, p, ids, mask), has_aux=True))(params)  # noqa: E731
    (l0, o0), g0 = grad(base)
    (l1, o1), g1 = grad(remat)
    np.testing.assert_allclose(o1, o0, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # the rematerialised program recomputes: the backward pass holds a checkpoint (remat) of each layer
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: _loss(remat, p, ids, mask)[0]))(params))
    assert "remat" in jaxpr or "checkpoint" in jaxpr


def test_remat_keeps_fewer_activations():
    """What the train step keeps for the backward pass, from the TPU compiler (libtpu, compile-only: XLA:CPU's
    scheduler recomputes early and shows no saving): the Sentence-T5 tiny step on a v4-32 slice, at a batch
    where activations dominate the temporaries."""
    from pathlib import Path

    from embedjax import aot
    from embedjax.config import load_config

    st5 = str(Path(__file__).resolve().parents[2] / "configs" / "sentence_t5.py") + ":tiny"
    temps = {}
    for policy in ("none", "full"):
        cfg = load_config(st5, ["batch_size=8192", "max_query_length=256", "max_document_length=256", f"remat_policy={policy!r}"])
        r = aot.check(cfg, aot.parse_topology("v4-32"), config_name=f"st5-tiny-{policy}")
        assert r.method == "compiled", r.libtpu_error
        temps[policy] = r.compiled["temporaries"]
    # measured 2026-12-02: none 632 MB, full 507 MB (0.80x) per chip; "dots" (matmul outputs kept) 663 MB
    assert temps["full"] < 0.9 * temps["none"], temps


@pytest.mark.parametrize("arch", list(ENCODERS))
def test_dropout_only_with_an_rng(arch):
    off, on = _cfg(arch), _cfg(arch, dropout_rate=0.3)
    params = init_params(off, jax.random.key(0))
    ids, mask = _inputs()
    _, ref = _loss(off, params, ids, mask)
    _, det = _loss(on, params, ids, mask)                      # no rng: evaluation / encoding / export
    np.testing.assert_array_equal(det, ref)
    _, a = _loss(on, params, ids, mask, {"dropout": jax.random.key(1)})
    _, a2 = _loss(on, params, ids, mask, {"dropout": jax.random.key(1)})
    _, b = _loss(on, params, ids, mask, {"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(a, a2)                       # reproducible from the key
    assert float(jnp.abs(a - ref).max()) > 1e-3                # it drops something
    assert float(jnp.abs(a - b).max()) > 1e-3                  # and depends on the key


def test_train_step_draws_new_masks_each_step_and_grad_cache_reuses_them():
    cfg = _cfg("bert", dropout_rate=0.2)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    objective, lp = make_objective({"name": "in_batch_softmax", "temperature": 0.05})
    state, _ = create_train_state(cfg, lp, optax.sgd(0.0), mesh, jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {k: jnp.asarray(rng.integers(1, 100, (8, 12)), jnp.int32) for k in ("query_ids", "positive_ids")}
    batch.update(query_mask=jnp.ones((8, 12), jnp.int32), positive_mask=jnp.ones((8, 12), jnp.int32))
    step = jax.jit(make_train_step(cfg, objective, optax.sgd(0.0), seed=3))
    s1, m1 = step(state, batch)
    s2, m2 = step(s1, batch)                                   # lr 0: same params, next step's masks
    assert float(m1["loss"]) != float(m2["loss"])
    s1b, m1b = step(state, batch)
    assert float(m1["loss"]) == float(m1b["loss"])             # step n's masks are a function of (seed, n)
    # grad caching recomputes each chunk with the key it was embedded with: same loss and gradients
    key = jax.random.key(5)
    plain = make_loss_and_grads(cfg, objective)(state.params, batch, key)
    cached = make_loss_and_grads(cfg, objective, grad_cache_chunks=2)(state.params, batch, key)
    assert float(plain[0]) != float(make_loss_and_grads(cfg, objective)(state.params, batch)[0])
    for a, b in zip(jax.tree.leaves(cached[2]), jax.tree.leaves(
            make_loss_and_grads(cfg, objective, grad_cache_chunks=2)(state.params, batch, key)[2])):
        np.testing.assert_array_equal(a, b)
    assert np.isfinite(float(cached[0]))


@pytest.mark.parametrize("arch", list(ENCODERS))
def test_bfloat16_compute_close_to_float32(arch):
    f32, bf16 = _cfg(arch), _cfg(arch, dtype="bfloat16")
    params = init_params(f32, jax.random.key(0))
    ids, mask = _inputs()
    _, ref = _loss(f32, params, ids, mask)
    _, out = _loss(bf16, params, ids, mask)
    assert out.dtype == jnp.float32
    assert jax.tree.leaves(params)[0].dtype == jnp.float32     # parameters stay float32
    cos = np.sum(np.asarray(out) * np.asarray(ref), -1) / (np.linalg.norm(out, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert cos.min() > 0.99, cos
    assert float(jnp.abs(out - ref).max()) > 0                 # it really ran in bfloat16


@pytest.mark.parametrize("arch", list(ENCODERS))
def test_bfloat16_parameters_halve_the_state_and_train(arch):
    """param_dtype=bfloat16: fresh and pretrained parameters, gradients and Adam's moments are stored in bfloat16
    (half the bytes of float32), the step trains, and pretrained weights arrive rounded, not changed."""
    f32, bf16 = _cfg(arch), _cfg(arch, param_dtype="bfloat16")
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    objective, lp = make_objective({"name": "in_batch_softmax", "temperature": 0.05})
    tx = optax.adamw(1e-2)
    pretrained = init_params(f32, jax.random.key(1))
    s32, _ = create_train_state(f32, lp, tx, mesh, jax.random.key(0), pretrained=pretrained)
    s16, _ = create_train_state(bf16, lp, tx, mesh, jax.random.key(0), pretrained=pretrained)
    nbytes = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))  # noqa: E731
    assert {x.dtype for x in jax.tree.leaves(s16.params["model"])} == {jnp.dtype(jnp.bfloat16)}
    assert nbytes(s16.params["model"]) * 2 == nbytes(s32.params["model"])
    assert nbytes(s16.opt_state) < 0.51 * nbytes(s32.opt_state)
    for a, b in zip(jax.tree.leaves(s16.params["model"]), jax.tree.leaves(pretrained)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(jnp.bfloat16))
    fresh, _ = create_train_state(bf16, lp, tx, mesh, jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves(fresh.params["model"])} == {jnp.dtype(jnp.bfloat16)}
    rng = np.random.default_rng(0)
    batch = {k: jnp.asarray(rng.integers(1, 100, (8, 12)), jnp.int32) for k in ("query_ids", "positive_ids")}
    batch.update(query_mask=jnp.ones((8, 12), jnp.int32), positive_mask=jnp.ones((8, 12), jnp.int32))
    step = jax.jit(make_train_step(bf16, objective, tx))
    losses = []
    state = s16
    for _ in range(4):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert {x.dtype for x in jax.tree.leaves(state.params["model"])} == {jnp.dtype(jnp.bfloat16)}
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses


def test_config_keys_reach_the_encoder_and_are_checked():
    c = base_config()
    c.init_from = "x"
    c.dtype, c.dropout_rate, c.remat_policy, c.param_dtype = "bfloat16", 0.1, "dots", "bfloat16"
    validate(c)
    enc = with_runtime(_cfg("t5"), c).encoder
    assert (enc.dtype, enc.dropout_rate, enc.remat, enc.param_dtype) == ("bfloat16", 0.1, "dots", "bfloat16")
    assert "param_dtype" not in enc.to_hf()
    assert "dropout_rate" not in enc.to_hf() or enc.to_hf()["dropout_rate"] == 0.1   # HF's own key, not ours
    assert "remat" not in enc.to_hf()
    for key, bad in (("dtype", "float16"), ("remat_policy", "everything"), ("dropout_rate", 1.0),
                     ("param_dtype", "float16")):
        c2 = base_config()
        c2.init_from = "x"
        c2[key] = bad
        with pytest.raises(ConfigError, match=key):
            validate(c2)
    # a Hugging Face T5 config's dropout_rate (0.1) is not read as ours: loading never turns dropout on
    assert T5Config.from_hf({"d_model": 8, "dropout_rate": 0.1}).dropout_rate == 0.0


@pytest.mark.parametrize("arch,extra", [("bert", {}), ("t5", {})])
def test_scanned_layers_same_values_gradients_and_weights(arch, extra):
    """scan_layers: one scanned stack computes what the loop of layers computes (values and gradients, with
    dropout and remat too); the stacked parameters are the per-layer ones (stack_layers / unstack_layers), carry
    the logical axis "layers" first, and the program holds one layer body instead of one per layer."""
    import flax.linen as nn

    from embedjax.models.layers import stack_layers, unstack_layers

    n = 4
    depth = {"bert": {"num_hidden_layers": n}, "t5": {"num_layers": n}}[arch]
    loop = ModelConfig(arch, dataclasses.replace(ENCODERS[arch], **depth, **extra), HeadConfig(pooling="mean"),
                       max_length=32)
    scan = dataclasses.replace(loop, encoder=dataclasses.replace(loop.encoder, scan_layers=True))
    params = init_params(loop, jax.random.key(0))
    stacked = {"tower": dict(params["tower"], encoder=stack_layers(params["tower"]["encoder"]))}
    assert jax.tree.structure(stacked) == jax.tree.structure(init_params(scan, jax.random.key(0)))
    leaf = stacked["tower"]["encoder"]["layers"]["query"]["kernel"]
    assert leaf.shape[0] == n
    boxed = jax.eval_shape(lambda: DualEncoder(scan).init(jax.random.key(0), *_inputs()))["params"]
    names = boxed["tower"]["encoder"]["layers"]["query"]["kernel"].names
    assert names[0] == "layers" and isinstance(boxed["tower"]["encoder"]["layers"]["query"]["kernel"],
                                                nn.LogicallyPartitioned)
    back = unstack_layers(stacked["tower"]["encoder"])
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params["tower"]["encoder"])):
        np.testing.assert_array_equal(a, b)

    ids, mask = _inputs()
    grad = lambda c, p: jax.jit(jax.value_and_grad(lambda p: _loss(c, p, ids, mask), has_aux=True))(p)  # noqa: E731
    (l0, o0), g0 = grad(loop, params)
    (l1, o1), g1 = grad(scan, stacked)
    np.testing.assert_allclose(o1, o0, atol=2e-6)
    g1 = {"tower": dict(g1["tower"], encoder=unstack_layers(g1["tower"]["encoder"]))}
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, atol=2e-5)
    # with remat and dropout it still trains (dropout keys differ per layer: split across the scan)
    both = dataclasses.replace(scan, encoder=dataclasses.replace(scan.encoder, remat="full", dropout_rate=0.2))
    out = DualEncoder(both).apply({"params": stacked}, ids, mask, rngs={"dropout": jax.random.key(1)})
    assert np.isfinite(np.asarray(out)).all() and np.abs(np.asarray(out) - np.asarray(o0)).max() > 1e-3
    # one layer body in the program, not n
    hlo = lambda c, p: jax.jit(lambda p: DualEncoder(c).apply({"params": p}, ids, mask)).lower(p).as_text()  # noqa: E731
    dots = hlo(scan, stacked).count("dot_general"), hlo(loop, params).count("dot_general")
    assert dots[0] * n == dots[1], dots


def test_scanned_layers_load_pretrained_save_back_and_refuse_modernbert(tmp_path, tiny_bert_dir):
    """A pretrained folder loads into the scanned layout (config key `scan_layers`), a sentence-transformers
    folder written from it has the per-layer weights again; ModernBERT (layers that differ) is refused."""
    from embedjax import Encoder
    from embedjax.models.source import resolve
    from embedjax.models.convert import save_sentence_transformers

    c = base_config()
    c.init_from = str(tiny_bert_dir)
    c.scan_layers = True
    validate(c)
    src = resolve(c)
    assert src.config.encoder.scan_layers and "layers" in src.params["tower"]["encoder"]
    ref = Encoder.load(tiny_bert_dir)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    objective, lp = make_objective({"name": "in_batch_softmax", "temperature": 0.05})
    state, _ = create_train_state(src.config, lp, optax.sgd(0.0), mesh, jax.random.key(0), pretrained=src.params)
    scanned = Encoder(src.config, state.params["model"], src.tokenizer)
    texts = ["a scanned stack of layers", "the same numbers"]
    np.testing.assert_allclose(scanned.encode(texts), ref.encode(texts), atol=1e-6)
    out = save_sentence_transformers(tmp_path / "st", src.config, jax.device_get(state.params["model"]),
                                     src.tokenizer)
    np.testing.assert_allclose(Encoder.load(out).encode(texts), ref.encode(texts), atol=1e-6)

    with pytest.raises(ValueError, match="scan_layers is not supported for ModernBERT"):
        dataclasses.replace(ENCODERS["modernbert"], scan_layers=True)


def test_a_model_config_runtime_field_must_agree_with_the_top_level_key():
    """model_config.encoder.dtype='bfloat16' with the top-level dtype left at float32 is an error naming both
    (the top-level key decides; a silently replaced dtype doubled Sentence-T5-XXL's activations once)."""
    from embedjax.models.source import resolve

    c = base_config()
    c.model_config = {"architecture": "t5", "encoder": {"vocab_size": 100, "d_model": 16, "d_kv": 4, "d_ff": 32,
                                                         "num_layers": 1, "num_heads": 4, "dtype": "bfloat16"},
                      "head": {"pooling": "mean"}, "max_length": 32}
    with pytest.raises(ConfigError, match=r"encoder dtype='bfloat16' differs from the top-level key "
                                          r"dtype='float32'"):
        resolve(c, weights=False, tokenizer=False)
    c.dtype = "bfloat16"
    assert resolve(c, weights=False, tokenizer=False).config.encoder.dtype == "bfloat16"
