"""The jitted train step on 8 fake devices: meshes and gradient caching agree with one device."""
import jax
import numpy as np
import optax
import pytest

from embedjax import sharding
from embedjax.models.bert import BertConfig
from embedjax.models.dual_encoder import HeadConfig, ModelConfig
from embedjax.objectives import make_objective
from embedjax.train_step import create_train_state, make_loss_and_grads

CFG = ModelConfig("bert", BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64),
                  HeadConfig(pooling="mean", normalize=True), max_length=32)


def _batch(B=32, L=16, K=0, seed=0):
    rng = np.random.default_rng(seed)
    b = {"query_ids": rng.integers(1, 120, (B, L)), "positive_ids": rng.integers(1, 120, (B, L))}
    b["query_mask"] = (np.arange(L)[None] < rng.integers(3, L + 1, (B, 1))).astype(np.int32)
    b["positive_mask"] = (np.arange(L)[None] < rng.integers(3, L + 1, (B, 1))).astype(np.int32)
    if K:
        b["negative_ids"] = rng.integers(1, 120, (B, K, L))
        b["negative_mask"] = np.ones((B, K, L), np.int32)
    return {k: np.asarray(v, np.int32) for k, v in b.items()}


def _run(mesh_shape, loss_cfg, batch, grad_cache=0):
    """Loss, metrics and gradients of one step, jitted on a mesh with sharded params and batch."""
    devs = jax.devices()[:int(np.prod(mesh_shape))]
    mesh = sharding.make_mesh(mesh_shape, devs)
    objective, lp = make_objective(loss_cfg)
    state, shards = create_train_state(CFG, lp, optax.sgd(1.0), mesh, jax.random.key(0))
    fn = jax.jit(make_loss_and_grads(CFG, objective, grad_cache_chunks=grad_cache),
                 compiler_options={"xla_backend_optimization_level": 0})  # compile fast; same math
    with jax.set_mesh(mesh):
        loss, metrics, grads = fn(state.params, sharding.global_batch(batch, mesh))
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["loss"] = float(loss)
    return jax.tree.map(np.asarray, grads), metrics, state


def _close(a, b, rtol=1e-5):
    """Per leaf: max |a - b| <= rtol * max |b|. Leaves whose gradient is mathematically zero (e.g. key biases:
    softmax ignores them) hold float noise ~1e-12, so the scale is floored at 1e-4 of the largest gradient.
    The learned log-temperature's gradient is one scalar sum over B x N logit terms that largely cancel, so its
    float32 error is a few times larger: it gets 5x the tolerance."""
    floor = 1e-4 * max(float(np.abs(y).max()) for y in jax.tree.leaves(b))
    for path, x, y in zip(jax.tree_util.tree_flatten_with_path(b)[0], jax.tree.leaves(a), jax.tree.leaves(b)):
        scale = max(float(np.abs(y).max()), floor)
        tol = rtol * scale * (5 if "'loss'" in jax.tree_util.keystr(path[0]) else 1)
        assert float(np.abs(x - y).max()) <= tol, (jax.tree_util.keystr(path[0]),
                                                             float(np.abs(x - y).max()), scale)


LOSSES = [
    {"name": "in_batch_softmax", "temperature": 0.05, "learn_temperature": True},
    {"name": "in_batch_softmax", "temperature": 0.05, "same_tower": True, "matryoshka_dims": (32, 16, 8)},
    {"name": "sigmoid"},
]


@pytest.mark.parametrize("loss_cfg", LOSSES, ids=["softmax_learned_t", "same_tower_matryoshka", "sigmoid"])
@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (4, 2, 1), (2, 2, 2)])
def test_meshes_match_single_device(mesh_shape, loss_cfg):
    batch = _batch()
    ref_g, ref_m, _ = _run((1, 1, 1), loss_cfg, batch)
    g, m, state = _run(mesh_shape, loss_cfg, batch)
    assert abs(m["loss"] - ref_m["loss"]) <= 1e-5 * abs(ref_m["loss"])
    _close(g, ref_g)
    # parameters really are sharded (FSDP over fsdp, tensor parallel over tensor)
    k = state.params["model"]["tower"]["encoder"]["layer_0"]["intermediate"]["kernel"]
    assert k.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_hard_negatives_on_mesh():
    batch = _batch(K=2)
    cfg = {"name": "in_batch_softmax", "temperature": 0.05}
    ref_g, ref_m, _ = _run((1, 1, 1), cfg, batch)
    g, m, _ = _run((4, 2, 1), cfg, batch)
    assert abs(m["loss"] - ref_m["loss"]) <= 1e-5 * abs(ref_m["loss"])
    _close(g, ref_g)


@pytest.mark.parametrize("loss_cfg", [LOSSES[0], LOSSES[1]], ids=["softmax", "matryoshka"])
def test_grad_cache_equals_plain(loss_cfg):
    batch = _batch(K=1)
    ref_g, ref_m, _ = _run((4, 2, 1), loss_cfg, batch)
    g, m, _ = _run((4, 2, 1), loss_cfg, batch, grad_cache=4)
    assert abs(m["loss"] - ref_m["loss"]) <= 1e-5 * abs(ref_m["loss"])
    _close(g, ref_g)


