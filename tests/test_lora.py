"""LoRA: a step changes only the adapters; the optimizer holds state for the adapters (and the loss's
parameters) only; merged and unmerged forward passes agree; gradient caching and the global-batch loss work
unchanged; a config that cannot have adapters is refused."""
import dataclasses

import jax
import numpy as np
import optax
import pytest
from flax import traverse_util

from embedjax import lora as lora_lib
from embedjax import sharding
from embedjax.lora import LoraConfig
from embedjax.models.bert import BertConfig
from embedjax.models.dual_encoder import DualEncoder, HeadConfig, ModelConfig
from embedjax.objectives import make_objective
from embedjax.train_step import (create_train_state, jit_train_step, make_loss_and_grads, make_train_step,
                                 model_params, trainable)

CFG = ModelConfig("bert", BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64),
                  HeadConfig(pooling="mean", normalize=True), max_length=32)
LORA = LoraConfig(rank=4, alpha=8.0)


def _batch(B=16, L=12, seed=0):
    rng = np.random.default_rng(seed)
    b = {"query_ids": rng.integers(1, 120, (B, L)), "positive_ids": rng.integers(1, 120, (B, L)),
         "query_mask": (np.arange(L)[None] < rng.integers(3, L + 1, (B, 1))),
         "positive_mask": (np.arange(L)[None] < rng.integers(3, L + 1, (B, 1)))}
    return {k: np.asarray(v, np.int32) for k, v in b.items()}


def _state(mesh, tx=None, lora=LORA):
    objective, lp = make_objective({"name": "in_batch_softmax", "temperature": 0.05, "learn_temperature": True})
    tx = tx or optax.adamw(1e-2)
    state, shards = create_train_state(CFG, lp, tx, mesh, jax.random.key(0), lora=lora)
    return objective, tx, state, shards


def test_targets_and_init():
    from embedjax.models.dual_encoder import init_params

    params = init_params(CFG, jax.random.key(0))
    paths = lora_lib.target_paths(LORA, params)
    assert paths == sorted(f"tower/encoder/layer_{i}/{n}" for i in range(2)
                           for n in ("attention_output", "key", "query", "value"))
    ad = traverse_util.flatten_dict(lora_lib.init_adapters(LORA, params, jax.random.key(1)), sep="/")
    assert ad["tower/encoder/layer_0/query/a"].shape == (32, 4)
    assert ad["tower/encoder/layer_0/query/b"].shape == (4, 32)
    assert not np.asarray(ad["tower/encoder/layer_0/query/b"]).any()   # training starts from the base model
    with pytest.raises(ValueError, match="matches no 2-D Dense kernel"):
        lora_lib.target_paths(LoraConfig(rank=2, targets="nothing_like_this"), params)
    with pytest.raises(ValueError, match="lora.rank must be an integer >= 0"):
        LoraConfig(rank=-1)


def test_a_step_changes_only_adapters_and_optimizer_state_is_theirs():
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    objective, tx, state, shards = _state(mesh)
    assert set(state.params) == {"model", "lora", "loss"}
    n_adapter = sum(x.size for x in jax.tree.leaves(state.params["lora"]))
    n_model = sum(x.size for x in jax.tree.leaves(state.params["model"]))
    # AdamW: two moments per trainable value (adapters + the learned temperature), nothing for the model
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert n_opt == 2 * n_adapter, (n_opt, n_adapter, n_model)
    before = jax.tree.map(np.asarray, state.params)
    step = jit_train_step(make_train_step(CFG, objective, tx, lora=LORA), shards, mesh)
    with jax.set_mesh(mesh):
        for s in range(3):
            state, metrics = step(state, sharding.global_batch(_batch(seed=s), mesh))
    after = jax.tree.map(np.asarray, state.params)
    for a, b in zip(jax.tree.leaves(before["model"]), jax.tree.leaves(after["model"])):
        np.testing.assert_array_equal(a, b)
    changed = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(before["lora"]), jax.tree.leaves(after["lora"]))]
    assert min(changed) > 0          # every A and B moved
    assert after["loss"]["log_t"] != before["loss"]["log_t"]


def test_merged_equals_unmerged_and_grads_have_no_model_part():
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    objective, tx, state, shards = _state(mesh)
    # adapters as after training (B no longer zero)
    state = state.replace(params=dict(state.params, lora=jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), state.params["lora"])))
    b = _batch()
    model = DualEncoder(CFG)
    unmerged = lora_lib.apply(model, state.params["model"], state.params["lora"], LORA.scale, b["query_ids"],
                              b["query_mask"])
    merged = model.apply({"params": model_params(state.params, LORA)}, b["query_ids"], b["query_mask"])
    base = model.apply({"params": state.params["model"]}, b["query_ids"], b["query_mask"])
    np.testing.assert_allclose(unmerged, merged, atol=1e-5, rtol=0)
    assert np.abs(np.asarray(merged) - np.asarray(base)).max() > 1e-3   # the adapters do something
    loss, _, grads = jax.jit(make_loss_and_grads(CFG, objective, lora=LORA))(state.params, b)
    assert set(grads) == {"lora", "loss"}   # no gradient of the frozen weights is ever formed
    # gradient caching: the same loss and adapter gradients
    loss_c, _, grads_c = jax.jit(make_loss_and_grads(CFG, objective, lora=LORA, grad_cache_chunks=4))(
        state.params, b)
    assert float(loss_c) == pytest.approx(float(loss), rel=1e-5)
    for x, y in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads)):
        np.testing.assert_allclose(x, y, atol=1e-5 * max(1.0, float(np.abs(y).max())))
    with pytest.raises(ValueError, match="pass the LoraConfig"):
        model_params(state.params)


def test_global_batch_loss_on_a_sharded_mesh_equals_one_device():
    """LoRA on 4 devices (batch over data, model over fsdp) gives the one-device loss and adapter gradients."""
    b = _batch(B=16)
    out = {}
    for shape in ({"data": 1}, {"data": 2, "fsdp": 2}):
        devs = jax.devices()[:int(np.prod(list(shape.values())))]
        mesh = sharding.make_mesh(shape, devs)
        objective, tx, state, _ = _state(mesh)
        fn = jax.jit(make_loss_and_grads(CFG, objective, lora=LORA))
        with jax.set_mesh(mesh):
            loss, _, grads = fn(state.params, sharding.global_batch(b, mesh))
        out[len(devs)] = (float(loss), jax.tree.map(np.asarray, grads))
    assert out[4][0] == pytest.approx(out[1][0], rel=1e-5)
    for x, y in zip(jax.tree.leaves(out[4][1]), jax.tree.leaves(out[1][1])):
        np.testing.assert_allclose(x, y, atol=1e-5 * max(1.0, float(np.abs(y).max())))


def test_config_checks():
    from embedjax.config import ConfigError, base_config, check_model_fit, validate
    from embedjax.experiment import assemble

    c = base_config()
    c.model_config = CFG.to_dict()
    c.lora.rank = 4
    c.optim.freeze = "embeddings"
    with pytest.raises(ConfigError, match="optim.freeze and lora.rank are exclusive"):
        validate(c)
    c.optim.freeze = ""
    scan = dataclasses.replace(CFG, encoder=dataclasses.replace(CFG.encoder, scan_layers=True))
    with pytest.raises(ConfigError, match="lora.rank needs scan_layers=False"):
        check_model_fit(c, scan)
    c.lora.targets = "("
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    with pytest.raises(ConfigError, match=r"lora.targets '\(' is not a valid regex"):
        assemble(c, mesh)
    assert trainable({"model": 1, "loss": 2}) == {"model": 1, "loss": 2}
    c.lora.targets = ".*"
    latent = dataclasses.replace(CFG, head=HeadConfig(pooling="latent_attention", latent_num=4, latent_heads=4))
    with pytest.raises(ConfigError, match="set export_final=False"):
        check_model_fit(c, latent)
    c.export_final = False
    check_model_fit(c, latent)
