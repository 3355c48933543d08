"""The jitted training step: pure, donated state, device-side metrics, optional gradient caching.

The batch is the data layer's (`embedjax.data.pipeline.batch_spec`: keys, shapes, dtypes; `TOWER_INPUTS`: which
keys each tower embeds), global arrays with the leading dim sharded over the batch axes.
"""
from __future__ import annotations

import logging

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from embedjax import lora as lora_lib
from embedjax import sharding
from embedjax.data.pipeline import TOWER_INPUTS
from embedjax.lora import LoraConfig
from embedjax.models.dual_encoder import DualEncoder, ModelConfig

Objective = Callable[[dict[str, jax.Array], dict[str, jax.Array], dict[str, jax.Array]],
                     tuple[jax.Array, dict[str, jax.Array]]]

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict          # {"model": ..., "loss": {...learned loss parameters...}} (+ "lora": adapters)
    opt_state: Any        # of `trainable(params)`


def trainable(params: dict) -> dict:
    """What the optimizer updates: everything, or with LoRA adapters ("lora") everything but the frozen model."""
    return {k: v for k, v in params.items() if k != "model"} if "lora" in params else params


def model_params(params: dict, lora: LoraConfig | None = None) -> Any:
    """The model's parameters as an ordinary model uses them: with LoRA, the adapters merged into the weights."""
    if "lora" not in params:
        return params["model"]
    if lora is None or not lora.enabled:
        raise ValueError("the state holds LoRA adapters: pass the LoraConfig they were trained with")
    return lora_lib.merge(params["model"], params["lora"], lora.scale)


def _tree_norm(tree: Any) -> jax.Array:
    return optax.tree.norm(tree)


# --------------------------------------------------------------------------------------------- embedding

def _embed_fn(model: DualEncoder, exit_layers: tuple[int, ...] = (), lora: LoraConfig | None = None):
    """embed(params, ids, mask, tower, rng=None): `params` is {"model": ...} (+ "lora": adapters)."""
    def embed(params, ids_BxL, mask_BxL, tower: str, rng: jax.Array | None = None) -> jax.Array:
        # a "dropout" rng turns the encoder's dropout on (layers.dropout); without one it is deterministic
        rngs = {} if rng is None else {"dropout": rng}
        kw = dict(tower=tower, rngs=rngs, exit_layers=exit_layers)
        if "lora" in params:
            return lora_lib.apply(model, params["model"], params["lora"], lora.scale, ids_BxL, mask_BxL, **kw)
        return model.apply({"params": params["model"]}, ids_BxL, mask_BxL, **kw)
    return embed


def _tower_rng(rng: jax.Array | None, index: int, chunks: int = 0) -> jax.Array | None:
    """The dropout key of one tower input of a step (and of each of its grad-cache chunks)."""
    if rng is None:
        return None
    key = jax.random.fold_in(rng, index)
    return jax.random.split(key, chunks) if chunks else key


def _towers(batch: dict[str, jax.Array]) -> list[tuple[str, str, str]]:
    """(output key, batch prefix, tower) for every tower input of the data layer's batch spec present."""
    return [t for t in TOWER_INPUTS if f"{t[1]}_ids" in batch]


def _flat(ids: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
    """[B, K, L] -> [B*K, L] (hard negatives embed like documents)."""
    lead = ids.shape[:-1]
    return ids.reshape(-1, ids.shape[-1]), lead


def _chunks(x: jax.Array, n: int) -> jax.Array:
    """[B, ...] -> [n, B/n, ...] taking rows j, n+j, 2n+j ... into chunk j, so every chunk keeps rows from every
    data shard (no cross-device movement when B is sharded in contiguous blocks)."""
    return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)


def _unchunks(x: jax.Array) -> jax.Array:
    return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])


# --------------------------------------------------------------------------------------------- state

def opt_state_shardings(abstract_opt_state: Any, abstract_params: Any, param_shards: Any, mesh) -> Any:
    """Optimizer-state leaves shaped like their parameter get the parameter's sharding; the rest replicate."""
    p_def = jax.tree.structure(abstract_params)
    p_leaves = jax.tree.leaves(abstract_params)
    s_leaves = jax.tree.leaves(param_shards, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    rep = sharding.replicated(mesh)

    def match(sub):
        if jax.tree.structure(sub) == p_def:
            return jax.tree.unflatten(p_def, [s if getattr(l, "shape", None) == p.shape else rep
                                              for l, p, s in zip(jax.tree.leaves(sub), p_leaves, s_leaves)])
        return None

    def walk(node):
        m = match(node)
        if m is not None:
            return m
        children, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
        if treedef.num_leaves == 1 and len(children) == 1 and children[0] is node:
            return rep
        if not children and jax.tree_util.treedef_is_leaf(treedef):
            return rep
        return jax.tree.unflatten(treedef, [walk(c) for c in children])

    return walk(abstract_opt_state)


def _model_init(model_cfg: ModelConfig, seq_len: int = 8):
    model = DualEncoder(model_cfg)
    ids = jnp.zeros((1, seq_len), jnp.int32)

    param_dtype = jnp.dtype(getattr(model_cfg.encoder, "param_dtype", "float32"))

    def init_boxed(rng):
        params = model.init(rng, ids, jnp.ones_like(ids), method=DualEncoder.init_both)["params"]
        if param_dtype == jnp.float32:
            return params
        # every floating parameter stored in `param_dtype` (the boxes keep their logical axis names)
        return jax.tree.map(lambda x: x.astype(param_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                            params)
    return init_boxed


def abstract_model_params(model_cfg: ModelConfig, mesh) -> Any:
    """The model's parameters as ShapeDtypeStructs carrying their shardings on `mesh` (nothing allocated): the
    restore target for reading a checkpoint's weights only (export, evaluation), with no optimizer built."""
    boxed = jax.eval_shape(_model_init(model_cfg), jax.random.key(0))
    shards = sharding.param_shardings(boxed, mesh)
    return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        nn.meta.unbox(boxed), shards)


def _init_adapters(lora: LoraConfig, abstract_model: Any) -> Callable[[jax.Array], dict]:
    return lambda rng: lora_lib.init_adapters(lora, abstract_model, jax.random.fold_in(rng, 0x10A))


def abstract_train_state(model_cfg: ModelConfig, loss_params: dict, tx: optax.GradientTransformation, mesh,
                         lora: LoraConfig | None = None) -> tuple[TrainState, TrainState]:
    """(abstract state: ShapeDtypeStructs carrying their shardings, state shardings); nothing is allocated.
    The restore target for a checkpoint, on whatever mesh `mesh` is. With `lora`, the state also holds the
    adapters (replicated: they are small) and the optimizer state is theirs and the loss's only."""
    boxed = jax.eval_shape(_model_init(model_cfg), jax.random.key(0))
    model_shards = sharding.param_shardings(boxed, mesh)
    rep = sharding.replicated(mesh)
    abstract_params = {"model": nn.meta.unbox(boxed),
                       "loss": {k: jax.ShapeDtypeStruct((), jnp.float32) for k in loss_params}}
    params_shards = {"model": model_shards, "loss": {k: rep for k in loss_params}}
    if lora is not None and lora.enabled:
        abstract_params["lora"] = jax.eval_shape(_init_adapters(lora, abstract_params["model"]), jax.random.key(0))
        params_shards["lora"] = jax.tree.map(lambda _: rep, abstract_params["lora"])
    abstract_opt = jax.eval_shape(tx.init, trainable(abstract_params))
    opt_shards = opt_state_shardings(abstract_opt, trainable(abstract_params), trainable(params_shards), mesh)
    shards = TrainState(step=rep, params=params_shards, opt_state=opt_shards)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params, opt_state=abstract_opt)
    # `shards` is a prefix of `abstract` (one sharding may stand for an empty optimizer-state node)
    abstract = jax.tree.map(
        lambda sh, sub: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), sub),
        shards, abstract, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return abstract, shards


def create_train_state(model_cfg: ModelConfig, loss_params: dict, tx: optax.GradientTransformation, mesh,
                       rng: jax.Array, pretrained: dict | None = None, lora: LoraConfig | None = None
                       ) -> tuple[TrainState, TrainState]:
    """Abstract first: shapes -> shardings -> jitted init with out_shardings. Returns (state, state_shardings).
    `pretrained` (the DualEncoder params tree, e.g. from Encoder.load) replaces the random init. `lora`: fresh
    adapters beside the (frozen) model."""
    abstract, shards = abstract_train_state(model_cfg, loss_params, tx, mesh, lora)
    abstract_model, model_shards = abstract.params["model"], shards.params["model"]

    if pretrained is not None:
        from flax import traverse_util

        want = traverse_util.flatten_dict(abstract_model, sep="/")
        have = traverse_util.flatten_dict(pretrained, sep="/")
        extra = sorted(set(have) - set(want))
        if extra:
            raise ValueError(f"pretrained param {extra[0]!r} is not part of the model config's parameters")
        for k, b in have.items():
            if tuple(want[k].shape) != tuple(np.shape(b)):
                raise ValueError(f"pretrained param {k!r} has shape {np.shape(b)}, the model {want[k].shape}")
        fresh = sorted(set(want) - set(have))
        if fresh:   # a partial tree (a new head on a pretrained encoder): the rest from the model's initialisers
            log.info("initialised fresh (not in the pretrained weights): %s", ", ".join(fresh))
            init_boxed = _model_init(model_cfg)
            model_params = traverse_util.flatten_dict(
                jax.jit(lambda r: nn.meta.unbox(init_boxed(r)), out_shardings=model_shards)(rng), sep="/")
        else:
            model_params = {}
        flat_shards = traverse_util.flatten_dict(model_shards, sep="/")
        for k, b in have.items():   # no device ever holds a whole weight
            dt = want[k].dtype   # the model's parameter dtype (`param_dtype`)
            if hasattr(b, "read"):   # a LazyWeight: each device's slice read from the checkpoint file
                model_params[k] = jax.make_array_from_callback(
                    tuple(b.shape), flat_shards[k], lambda idx, b=b, dt=dt: np.asarray(b.read(idx)).astype(dt))
            elif isinstance(b, jax.Array):   # a restored array stays put
                model_params[k] = jax.device_put(b.astype(dt) if b.dtype != dt else b, flat_shards[k])
            else:   # host numpy straight to the shards
                model_params[k] = jax.device_put(np.asarray(b, np.float32).astype(dt), flat_shards[k])
        model_params = traverse_util.unflatten_dict(model_params, sep="/")
    else:
        init_boxed = _model_init(model_cfg)
        model_params = jax.jit(lambda r: nn.meta.unbox(init_boxed(r)), out_shardings=model_shards)(rng)

    loss_params = {k: jnp.asarray(v, jnp.float32) for k, v in loss_params.items()}
    params = {"model": model_params, "loss": jax.device_put(loss_params, shards.params["loss"])}
    if "lora" in abstract.params:
        params["lora"] = jax.jit(_init_adapters(lora, abstract_model), out_shardings=shards.params["lora"])(rng)
    opt_state = jax.jit(tx.init, out_shardings=shards.opt_state)(trainable(params))
    state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), shards.step), params=params,
                       opt_state=opt_state)
    return state, shards


# --------------------------------------------------------------------------------------------- step

def make_loss_and_grads(model_cfg: ModelConfig, objective: Objective, *, grad_cache_chunks: int = 0,
                        exit_layers: tuple[int, ...] = (), lora: LoraConfig | None = None
                        ) -> Callable[..., tuple[jax.Array, dict, dict]]:
    """(params, batch, rng=None) -> (loss, metrics, grads). `rng`: the step's dropout key (None: no dropout).
    `grads` are those of `trainable(params)`: with LoRA adapters in `params`, of the adapters and the loss's
    parameters only (the frozen model is a constant of the differentiated function).

    `exit_layers` (2D Matryoshka): every embedding the objective sees is the full model's followed by those
    after each of these layer counts, concatenated on the last axis (`objectives.two_d_matryoshka` splits them),
    all from one forward pass; gradient caching treats them as one wider embedding.

    grad_cache_chunks > 1 turns on gradient caching: embeddings are computed chunk by chunk without keeping
    activations, the loss gradient is taken w.r.t. the embeddings, then each chunk is recomputed with `vjp`
    (with the same dropout keys, so the recomputed chunk is the one the loss saw).
    """
    model = DualEncoder(model_cfg)
    embed_full = _embed_fn(model, tuple(exit_layers), lora)

    def forward_all(p, batch, rng):
        embs = {}
        for i, (key, prefix, tower) in enumerate(_towers(batch)):
            ids, lead = _flat(batch[f"{prefix}_ids"])
            mask, _ = _flat(batch[f"{prefix}_mask"])
            embs[key] = embed_full(p, ids, mask, tower, _tower_rng(rng, i)).reshape(*lead, -1)
        return embs

    def plain(params, batch, rng=None):
        def total(t):
            p = {**params, **t}
            return objective(forward_all(p, batch, rng), p["loss"], batch)
        (loss, metrics), grads = jax.value_and_grad(total, has_aux=True)(trainable(params))
        return loss, metrics, grads

    def cached(params, batch, rng=None):
        n = grad_cache_chunks
        part = "lora" if "lora" in params else "model"   # the differentiated part of the model

        def embed(d, *args):
            return embed_full({**params, part: d}, *args)
        mp = params[part]
        embs, inputs = {}, {}
        for i, (key, prefix, tower) in enumerate(_towers(batch)):
            ids, lead = _flat(batch[f"{prefix}_ids"])
            mask, _ = _flat(batch[f"{prefix}_mask"])
            if ids.shape[0] % n:
                raise ValueError(f"grad cache: {prefix} batch {ids.shape[0]} not divisible by {n} chunks")
            ids_c, mask_c = _chunks(ids, n), _chunks(mask, n)
            keys_c = _tower_rng(rng, i, n)
            if keys_c is None:
                e = jax.lax.map(lambda xs, t=tower: embed(mp, xs[0], xs[1], t), (ids_c, mask_c))
            else:
                e = jax.lax.map(lambda xs, t=tower: embed(mp, xs[0], xs[1], t, xs[2]), (ids_c, mask_c, keys_c))
            embs[key] = jax.lax.stop_gradient(_unchunks(e)).reshape(*lead, -1)
            inputs[key] = (ids_c, mask_c, keys_c, tower, lead)

        def on_embs(e, lp):
            return objective(e, lp, batch)
        (loss, metrics), (g_embs, g_loss) = jax.value_and_grad(on_embs, argnums=(0, 1), has_aux=True)(
            embs, params["loss"])
        g_model = jax.tree.map(jnp.zeros_like, mp)
        for key, (ids_c, mask_c, keys_c, tower, lead) in inputs.items():
            g_c = _chunks(g_embs[key].reshape(-1, g_embs[key].shape[-1]), n)

            def body(acc, xs, tower=tower):
                i, m, g, k = xs
                _, vjp = jax.vjp(lambda p: embed(p, i, m, tower, k), mp)
                return jax.tree.map(jnp.add, acc, vjp(g)[0]), None

            g_model, _ = jax.lax.scan(body, g_model, (ids_c, mask_c, g_c, keys_c))
        return loss, metrics, {part: g_model, "loss": g_loss}

    return cached if grad_cache_chunks and grad_cache_chunks > 1 else plain


def make_train_step(model_cfg: ModelConfig, objective: Objective, tx: optax.GradientTransformation, *,
                    grad_cache_chunks: int = 0, lr_schedule: Callable[[jax.Array], jax.Array] | None = None,
                    seed: int = 0, exit_layers: tuple[int, ...] = (), lora: LoraConfig | None = None
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Returns step(state, batch) -> (new_state, metrics); jit it with `jit_train_step`. With a dropout rate
    in `model_cfg`, step n draws its dropout masks from key(seed) folded with n (so a resumed run repeats them)."""
    compute = make_loss_and_grads(model_cfg, objective, grad_cache_chunks=grad_cache_chunks,
                                  exit_layers=exit_layers, lora=lora)
    dropout_on = float(getattr(model_cfg.encoder, "dropout_rate", 0.0)) > 0.0

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(jax.random.key(seed), state.step) if dropout_on else None
        loss, metrics, grads = compute(state.params, batch, rng)
        t = trainable(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, t)
        params = {**state.params, **optax.apply_updates(t, updates)}   # a frozen model passes through
        metrics = dict(metrics)
        metrics.update(loss=loss, grad_norm=_tree_norm(grads), param_norm=_tree_norm(params["model"]),
                       update_norm=_tree_norm(updates))
        if "log_t" in params["loss"]:
            metrics["temperature"] = jnp.exp(params["loss"]["log_t"])
        if lr_schedule is not None:
            metrics["learning_rate"] = lr_schedule(state.step)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


def jit_train_step(step_fn, state_shardings: TrainState, mesh):
    """jit with donated state; batch shardings come from the (already sharded) input arrays."""
    from embedjax.models.layers import compiler_options
    return jax.jit(step_fn, donate_argnums=(0,), out_shardings=(state_shardings, sharding.replicated(mesh)),
                   compiler_options=compiler_options(mesh.devices.flat))
