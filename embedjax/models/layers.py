"""Shared Flax Linen building blocks.

Every parameter is created through `nn.with_logical_partitioning` so that the sharding rules in
`embedjax.sharding` (one table, logical -> physical) decide placement; models never name mesh axes.

Logical axis names used by the models:
  vocab   vocabulary rows of an embedding table
  embed   the model (hidden) dimension
  heads   fused heads * head_dim dimension of attention projections (the key / value heads of grouped-query
          attention too: fewer of them, same axis)
  mlp     feed-forward hidden dimension
  pos     position-embedding rows / relative-position buckets
  proj    output dimension of the sentence-embedding projection
  norm    scale / bias vectors of normalisation layers (replicated)
  latents rows of the learned latent array of latent-attention pooling (replicated)
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np
import jax.numpy as jnp
import flax.linen as nn

from embedjax.sharding import activation_batch_shards

Dtype = Any
Initializer = Callable[..., jax.Array]

default_init = nn.initializers.normal(stddev=0.02)


def gelu_erf(x: jax.Array) -> jax.Array:
    """GELU with the exact erf form (HF 'gelu')."""
    return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU with the tanh approximation (HF 'gelu_new' / 'gelu_pytorch_tanh')."""
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu_erf,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "identity": lambda x: x,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; supported: {sorted(ACTIVATIONS)}") from None


class Dense(nn.Module):
    """y = x @ kernel (+ bias). kernel is [in, out] with logical axes `axes`."""

    features: int
    axes: tuple[str, str]
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = default_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
            (x.shape[-1], self.features), self.param_dtype)
        y = jnp.einsum("...i,io->...o", x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class Embed(nn.Module):
    """Lookup table [num, features] with logical axes `axes`."""

    num: int
    features: int
    axes: tuple[str, str] = ("vocab", "embed")
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    embedding_init: Initializer = default_init

    def setup(self) -> None:
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(self.embedding_init, self.axes),
            (self.num, self.features), self.param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm computed exactly as torch.nn.LayerNorm (two-pass variance), in float32."""

    eps: float = 1e-12
    dtype: Dtype = jnp.float32
    use_bias: bool = True           # ModernBERT: LayerNorm without bias

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (d,), jnp.float32)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centered = x32 - mean
        var = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
        y = centered * jax.lax.rsqrt(var + self.eps) * scale
        if self.use_bias:
            y = y + self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (d,),
                               jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """T5 LayerNorm: no mean subtraction, no bias, variance in float32. `zero_centered` (Gemma): the stored scale
    is applied as (1 + scale) and starts at zero."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    zero_centered: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        init = nn.initializers.zeros if self.zero_centered else nn.initializers.ones
        scale = self.param("scale", nn.with_logical_partitioning(init, ("norm",)), (d,), jnp.float32)
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.eps)
        return ((1.0 + scale if self.zero_centered else scale) * y).astype(self.dtype)


# Training-time settings every encoder config carries (`dtype` is the third): they change how a step runs,
# never what a trained model computes at inference, so they are not written to Hugging Face configs.
RUNTIME_FIELDS = ("dropout_rate", "remat", "param_dtype", "scan_layers")

# Rematerialisation of each encoder layer in the backward pass (`remat` of the encoder configs; the trainer's
# `remat_policy`): "none" keeps every activation; "full" keeps only each layer's input and recomputes the rest;
# "dots" also keeps the results of weight matmuls (no batch dimensions), recomputing attention and elementwise work.
REMAT_POLICIES = {"none": None, "full": "nothing_saveable", "dots": "dots_with_no_batch_dims_saveable"}


def layer_class(cls: type[nn.Module], remat: str) -> type[nn.Module]:
    """`cls`, or `cls` rematerialised (`nn.remat`) with the named policy. Parameter names are unchanged."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat policy must be one of {', '.join(REMAT_POLICIES)}, got {remat!r}")
    if REMAT_POLICIES[remat] is None:
        return cls
    return nn.remat(cls, policy=getattr(jax.checkpoint_policies, REMAT_POLICIES[remat]), prevent_cse=True)


def run_layers(layer_cls: type[nn.Module], cfg: Any, n: int, x: jax.Array, *args: Any,
               exits: tuple[int, ...] = ()) -> Any:
    """`n` layers of `layer_cls(cfg)` applied in turn to `x` (the other `args` go to every layer unchanged),
    rematerialised per `cfg.remat`. With `cfg.scan_layers` one `nn.scan` over a stack of layers: parameters
    `layers/...` with a leading layer axis (logical name "layers"), one layer body traced and compiled instead of
    `n` (compile time and program size no longer grow with depth); else `layer_0` ... `layer_{n-1}`. A layer's
    `__call__` returns `scan_out(cfg, y)`.

    `exits` (2D Matryoshka): also return the states after each of these layer counts, as `(x, [x_exit, ...])`;
    the same states a model cut to that many layers (`dual_encoder.truncate_layers`) ends with."""
    exits = check_exits(exits, n)
    layer = layer_class(layer_cls, cfg.remat)
    if not cfg.scan_layers:
        states = []
        for i in range(n):
            x = layer(cfg, name=f"layer_{i}")(x, *args)
            if i + 1 in exits:
                states.append(x)
        return (x, states) if exits else x
    if exits:
        raise ValueError("2D Matryoshka (states after fewer layers) is not supported with scan_layers=True: the "
                         "scanned stack returns only its last state; set scan_layers=False")
    scanned = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast,) * len(args), length=n,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = scanned(cfg, name="layers")(x, *args)
    return x


def check_exits(exits: Any, n: int) -> tuple[int, ...]:
    """Layer counts to exit after: increasing, each in [1, n) (the full depth is always the main output)."""
    out = tuple(int(e) for e in exits)
    if any(not 1 <= e < n for e in out) or list(out) != sorted(set(out)):
        raise ValueError(f"exit layers must be increasing layer counts in [1, {n - 1}] (the model has {n} "
                         f"layers), got {list(exits)}")
    return out


def scan_out(cfg: Any, y: jax.Array) -> Any:
    """What a layer returns: `y`, or `(y, None)` (carry, no per-layer output) when the layers are scanned."""
    return (y, None) if cfg.scan_layers else y


def stack_layers(params: dict) -> dict:
    """`layer_0` ... `layer_{n-1}` of an encoder's params -> `layers`, each leaf stacked on a new first axis (the
    layout of `scan_layers`). Lazily read weights stay lazy (`StackedWeight`)."""
    n = sum(1 for k in params if k.startswith("layer_") and k[6:].isdigit())
    if n == 0:   # already stacked
        return params
    parts = [params[f"layer_{i}"] for i in range(n)]
    out = {k: v for k, v in params.items() if not (k.startswith("layer_") and k[6:].isdigit())}

    def stack(*leaves):
        if hasattr(leaves[0], "read"):
            return StackedWeight(leaves)
        return np.stack([np.asarray(x) for x in leaves])
    out["layers"] = jax.tree.map(stack, *parts, is_leaf=lambda x: hasattr(x, "read"))
    return out


def unstack_layers(params: dict) -> dict:
    """The inverse of `stack_layers`."""
    out = {k: v for k, v in params.items() if k != "layers"}
    n = jax.tree.leaves(params["layers"])[0].shape[0]
    for i in range(n):
        out[f"layer_{i}"] = jax.tree.map(lambda x, i=i: np.asarray(x[i]), params["layers"])
    return out


class StackedWeight:
    """Lazily read weights (see `convert.LazyWeight`) of every layer, as one [n, ...] array: `read(index)` reads
    only the layers and slices `index` asks for."""

    def __init__(self, parts: Any):
        self.parts = tuple(parts)
        self.dtype = np.dtype(np.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.parts),) + tuple(self.parts[0].shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def read(self, index: tuple[slice, ...] | None = None) -> np.ndarray:
        idx = tuple(index) if index is not None else ()
        first, rest = (idx[0], idx[1:]) if idx else (slice(None), ())
        return np.stack([self.parts[i].read(rest) for i in range(len(self.parts))[first]])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        x = self.read()
        return x if dtype is None else x.astype(dtype)


def dropout(module: nn.Module, x: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout at `rate` when `module` was applied with a "dropout" rng (a training step), else `x`
    unchanged: evaluation, encoding and export, which pass no such rng, are deterministic."""
    if rate <= 0.0 or not module.has_rng("dropout"):
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


# On CPU, attention over a large batch runs a row block at a time (see `masked_attention`): the [H, L, L]
# logits of one block then stay in cache through the softmax. Bytes of float32 logits per block, per device.
CPU_ATTENTION_BLOCK_BYTES = 4 << 20


def masked_attention(q_BxLxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxK: jax.Array,
                     mask_BxL: jax.Array, *, scale: float | None, bias_1xHxLxL: jax.Array | None = None,
                     window: int | None = None, row_blocks: bool | None = None, causal: bool = False) -> jax.Array:
    """Softmax attention over keys where mask is 1. Logits and softmax in float32.

    Through `jax.nn.dot_product_attention` (XLA implementation; 1.8x faster on CPU than the same math written
    as two einsums). `scale=None` means no scaling (T5). `window`: a query sees only keys at distance <= window
    (bidirectional local attention, ModernBERT). `causal`: a query at i sees only keys at j <= i (with `window`:
    i - window <= j <= i, the one-sided window of decoder sliding-window layers).

    Keys and values may have fewer heads than queries (grouped-query attention: query head h reads key / value
    head h // (H / H_kv), the grouping of transformers' `repeat_kv`). A query row whose every key is masked
    (a padding position before the text under causal attention, with left padding) gets a uniform average of
    the values, never NaN; its output is padding and means nothing.

    `row_blocks` (default: on the CPU backend when the logits exceed `CPU_ATTENTION_BLOCK_BYTES` per device):
    the batch is processed a block of rows at a time in a `lax.map`, each block rematerialised in the backward
    pass. The numbers are the same; on CPU the [B, H, L, L] logits otherwise stream through memory several
    times (MiniLM, 64 x 256 tokens, one layer: forward 0.58 -> 0.29 s, forward + backward 1.40 -> 1.14 s), and
    training no longer keeps every layer's attention probabilities. Blocks take rows strided across the batch
    so that each device keeps its own rows when the batch is sharded. GPU/TPU keep the one fused call."""
    mask_Bx1x1xL = mask_BxL[:, None, None, :].astype(bool)
    if window is not None or causal:
        L = mask_BxL.shape[1]
        offset_LxL = np.arange(L)[:, None] - np.arange(L)[None, :]    # query position - key position
        near_LxL = np.ones((L, L), bool) if window is None else np.abs(offset_LxL) <= window
        if causal:
            near_LxL &= offset_LxL >= 0
        mask_Bx1x1xL = mask_Bx1x1xL & near_LxL[None, None]
    bias = None if bias_1xHxLxL is None else bias_1xHxLxL.astype(jnp.float32)

    def attend(q, k, v, m):
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=m, scale=1.0 if scale is None else scale,
                                            implementation="xla")

    B, L, H, _ = q_BxLxHxK.shape
    blocks = _attention_row_blocks(B, H, L) if row_blocks is not False else 1
    if row_blocks is None and compute_platform() != "cpu":
        blocks = 1
    if blocks <= 1:
        return attend(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask_Bx1x1xL)

    def split(x):   # [B, ...] -> [blocks, B / blocks, ...]: block j holds rows j, j + blocks, ...
        return jnp.swapaxes(x.reshape((B // blocks, blocks) + x.shape[1:]), 0, 1)

    out = jax.lax.map(jax.checkpoint(lambda a: attend(*a)),
                      (split(q_BxLxHxK), split(k_BxLxHxK), split(v_BxLxHxK), split(mask_Bx1x1xL)))
    return jnp.swapaxes(out, 0, 1).reshape(q_BxLxHxK.shape[:3] + out.shape[-1:])


def cached_attention(q_BxQxHxK: jax.Array, k_BxGxTxK: jax.Array, v_BxGxTxK: jax.Array, mask_BxT: jax.Array,
                     first_slot: Any, *, scale: float, window: int | None = None) -> jax.Array:
    """Causal attention of Q queries, at slots `first_slot` .. `first_slot` + Q - 1 of a key / value cache of T
    slots ([B, G, T, K]: heads before slots, `decoder.KVCache`), over the cache (the queries' own keys already
    written into it). A query at slot i sees the keys at slots j <= i where `mask_BxT` is 1 (with `window`:
    i - window <= j <= i), the index-based masks `masked_attention(causal=True)` builds for a whole sequence, so
    prefill and step-by-step decoding compute the same thing. Grouped-query heads (query head h reads key / value
    head h // (H / G), as transformers' `repeat_kv`) and fully masked rows (a uniform average of the values, never
    NaN) as in `masked_attention`; the math of `jax.nn.dot_product_attention`'s XLA implementation (logits and
    softmax in float32, masked logits at -0.7 x the float32 maximum), written as two einsums over the cache's own
    layout so that no step copies or transposes the cache (the cache's [B, G] lead the batched matmuls)."""
    B, Q, H, K = q_BxQxHxK.shape
    G, T = k_BxGxTxK.shape[1], k_BxGxTxK.shape[2]
    q_BxGxRxQxK = q_BxQxHxK.reshape(B, Q, G, H // G, K).transpose(0, 2, 3, 1, 4)
    logits_BxGxRxQxT = jnp.einsum("bgrqk,bgtk->bgrqt", q_BxGxRxQxK, k_BxGxTxK, preferred_element_type=jnp.float32)
    logits_BxGxRxQxT = logits_BxGxRxQxT * jnp.float32(scale)
    q_slot_Qx1 = (first_slot + jnp.arange(Q, dtype=jnp.int32))[:, None]
    k_slot_1xT = jnp.arange(T, dtype=jnp.int32)[None, :]
    near_QxT = k_slot_1xT <= q_slot_Qx1
    if window is not None:
        near_QxT &= q_slot_Qx1 - k_slot_1xT <= window
    mask_Bx1x1xQxT = mask_BxT[:, None, None, None, :].astype(bool) & near_QxT[None, None, None]
    big_negative = jnp.float32(-0.7 * float(jnp.finfo(jnp.float32).max))
    probs = jax.nn.softmax(jnp.where(mask_Bx1x1xQxT, logits_BxGxRxQxT, big_negative), axis=-1)
    ctx_BxGxRxQxK = jnp.einsum("bgrqt,bgtk->bgrqk", probs.astype(v_BxGxTxK.dtype), v_BxGxTxK)
    return ctx_BxGxRxQxK.transpose(0, 3, 1, 2, 4).reshape(B, Q, H, K)


def compute_platform() -> str:
    """The platform the traced computation is for: that of the mesh in context (an ahead-of-time compile for a
    TPU topology traces on a CPU host), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


# XLA options for computations compiled for the CPU backend (the encoder's forward pass and the train step).
# Without YNNPACK fusions (XLA's default for dots and reductions on CPU; XLA's own emitters and Eigen dots
# instead) MiniLM encodes 64 SciFact documents at 256 tokens 1.25x faster on this 2-core AMD EPYC (3.17 vs
# 3.98 s, interleaved; STS-B sentences at batch 128: equal), outputs within 2e-7; keeping only YNNPACK's
# reductions was no better. README, "Profile of a long-text encode". `CPU_XLA_OPTIONS_ENABLED = False`
# keeps XLA's defaults.
CPU_XLA_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
CPU_XLA_OPTIONS_ENABLED = True


def compiler_options(devices: Any = None) -> dict | None:
    """`jax.jit(..., compiler_options=...)` for a computation placed on `devices` (default: the default
    backend): `CPU_XLA_OPTIONS` on CPU, nothing elsewhere (a TPU compiler refuses flags it does not know)."""
    platform = jax.default_backend() if devices is None else next(iter(devices)).platform
    return dict(CPU_XLA_OPTIONS) if platform == "cpu" and CPU_XLA_OPTIONS_ENABLED else None


def _attention_row_blocks(B: int, H: int, L: int) -> int:
    """How many row blocks `masked_attention` splits a batch into: blocks of whole rows per device whose
    logits fit `CPU_ATTENTION_BLOCK_BYTES` (1 when the whole batch already does)."""
    if not all(isinstance(d, int) for d in (B, H, L)):   # symbolic shapes (the SavedModel's batch): one call
        return 1
    shards = activation_batch_shards(B)
    local = B // shards
    row_bytes = H * L * L * 4
    if local * row_bytes <= CPU_ATTENTION_BLOCK_BYTES:
        return 1
    rows = max(1, CPU_ATTENTION_BLOCK_BYTES // row_bytes)
    while local % rows:      # whole blocks of local rows
        rows -= 1
    return local // rows


def rotary(x_BxLxHxK: jax.Array, positions: Any, theta: float) -> jax.Array:
    """Rotary position embedding, the rotate-half layout of transformers (first half of each head's dims pairs
    with the second), angles and products in float32.

    `positions`: [L] host numpy positions shared by every row (the tables are constants of the compiled
    program), or a [B, L] jax array of per-row positions (generation: positions counted from each row's first
    real token, as transformers' generate passes them)."""
    K = x_BxLxHxK.shape[-1]
    inv_freq = 1.0 / (theta ** (np.arange(0, K, 2, dtype=np.float32) / K))
    if isinstance(positions, jax.Array):
        freqs_BxLxK2 = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
        emb_BxLxK = jnp.concatenate([freqs_BxLxK2, freqs_BxLxK2], axis=-1)
        cos, sin = jnp.cos(emb_BxLxK)[:, :, None, :], jnp.sin(emb_BxLxK)[:, :, None, :]
    else:
        freqs_LxK2 = np.asarray(positions, np.float32)[:, None] * inv_freq[None, :]
        emb_LxK = np.concatenate([freqs_LxK2, freqs_LxK2], axis=-1)
        cos, sin = (jnp.asarray(f(emb_LxK))[None, :, None, :] for f in (np.cos, np.sin))
    x = x_BxLxHxK.astype(jnp.float32)
    rotated = jnp.concatenate([-x[..., K // 2:], x[..., : K // 2]], axis=-1)
    return (x * cos + rotated * sin).astype(x_BxLxHxK.dtype)


def head_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
