"""ModernBERT encoder (answerdotai/ModernBERT-base / -large; modernbert-embed, gte-modernbert): pre-norm layers
without biases, rotary positions with a global base for full-attention layers and a local base for the
sliding-window ones (every `global_attn_every_n_layers`-th layer attends globally, the others within
`local_attention // 2` tokens either side), GeGLU feed-forward, a LayerNorm on the embeddings and one at the end.

Numerically follows Hugging Face `ModernBertModel` (eval mode, padded inputs). The fused Wqkv and Wi weights of
the checkpoint are split into query / key / value and input / gate on loading (`embedjax.models.convert`), so
each carries its own logical axes for tensor parallelism.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from embedjax.models.layers import (Dense, Embed, LayerNorm, activation, head_scale,
                                     masked_attention, rotary, RUNTIME_FIELDS, dropout, layer_class, check_exits)
from embedjax.sharding import ACTIVATION_BxLxD, logical_constraint

_FULL, _SLIDING = "full_attention", "sliding_attention"


@dataclasses.dataclass(frozen=True)
class ModernBertConfig:
    vocab_size: int = 50368
    hidden_size: int = 768
    intermediate_size: int = 1152
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    hidden_activation: str = "gelu"
    max_position_embeddings: int = 8192
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    local_attention: int = 128
    global_attn_every_n_layers: int = 3
    layer_types: tuple[str, ...] = ()          # per layer "full_attention" | "sliding_attention"; () = the pattern
    global_rope_theta: float = 160_000.0
    local_rope_theta: float = 10_000.0
    pad_token_id: int = 50283
    model_type: str = "modernbert"
    dtype: str = "float32"
    dropout_rate: float = 0.0      # training only (a step given a "dropout" rng); see layers.dropout
    remat: str = "none"            # layers.REMAT_POLICIES
    param_dtype: str = "float32"   # dtype the trainer stores parameters (and so optimizer state) in
    scan_layers: bool = False      # not supported: its layers differ (see __post_init__)

    def __post_init__(self) -> None:
        if not self.layer_types:
            types = tuple(_SLIDING if i % self.global_attn_every_n_layers else _FULL
                          for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", types)
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        bad = sorted(set(self.layer_types) - {_FULL, _SLIDING})
        if bad or len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types must name {self.num_hidden_layers} layers as {_FULL} / {_SLIDING}, "
                             f"got {list(self.layer_types)}")
        if self.scan_layers:
            raise ValueError("scan_layers is not supported for ModernBERT: its layers differ (global and local "
                             "attention, no attention norm in the first); set scan_layers=False")

    @property
    def hidden_dim(self) -> int:
        return self.hidden_size

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModernBertConfig":
        fields = {f.name for f in dataclasses.fields(cls)} - set(RUNTIME_FIELDS) - {"dtype", "global_rope_theta", "local_rope_theta"}
        kw = {k: cfg[k] for k in fields if k in cfg and cfg[k] is not None}
        rope = cfg.get("rope_parameters") or {}
        for key, layer_type in (("global_rope_theta", _FULL), ("local_rope_theta", _SLIDING)):
            params = rope.get(layer_type) or {}
            if params.get("rope_type", "default") != "default":
                raise ValueError(f"rope_type {params['rope_type']!r} for {layer_type} is not supported (only "
                                 "'default')")
            theta = params.get("rope_theta", cfg.get(key))
            if theta is not None:
                kw[key] = float(theta)
        if cfg.get("rope_scaling"):
            raise ValueError(f"rope_scaling {cfg['rope_scaling']!r} is not supported")
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("dtype")
        for k in RUNTIME_FIELDS:
            d.pop(k)
        d["layer_types"] = list(self.layer_types)
        d.update(architectures=["ModernBertModel"],
                 rope_parameters={_FULL: {"rope_type": "default", "rope_theta": self.global_rope_theta},
                                  _SLIDING: {"rope_type": "default", "rope_theta": self.local_rope_theta}})
        return d


def _constrain(x_BxLxD):
    return logical_constraint(x_BxLxD, ACTIVATION_BxLxD)


class ModernBertLayer(nn.Module):
    cfg: ModernBertConfig
    index: int

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, mask_BxL: jax.Array) -> jax.Array:
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        H = cfg.num_attention_heads
        K = cfg.hidden_size // H
        B, L, D = x_BxLxD.shape
        sliding = cfg.layer_types[self.index] == _SLIDING
        norm = dict(eps=cfg.norm_eps, dtype=dtype, use_bias=cfg.norm_bias)
        h = x_BxLxD if self.index == 0 else LayerNorm(name="attention_norm", **norm)(x_BxLxD)
        qkv = [Dense(H * K, ("embed", "heads"), use_bias=cfg.attention_bias, dtype=dtype, name=n)(h).reshape(B, L, H, K)
               for n in ("query", "key", "value")]
        positions = np.arange(L)   # static: the rotary tables are constants of the compiled program
        theta = cfg.local_rope_theta if sliding else cfg.global_rope_theta
        q, k = rotary(qkv[0], positions, theta), rotary(qkv[1], positions, theta)
        ctx = masked_attention(q, k, qkv[2], mask_BxL, scale=head_scale(K),
                               window=cfg.local_attention // 2 if sliding else None).reshape(B, L, H * K)
        x_BxLxD = x_BxLxD + dropout(self, Dense(D, ("heads", "embed"), use_bias=cfg.attention_bias, dtype=dtype,
                                                name="attention_output")(ctx), cfg.dropout_rate)
        h = LayerNorm(name="mlp_norm", **norm)(x_BxLxD)
        gate_in = Dense(cfg.intermediate_size, ("embed", "mlp"), use_bias=cfg.mlp_bias, dtype=dtype, name="wi_0")(h)
        gate = Dense(cfg.intermediate_size, ("embed", "mlp"), use_bias=cfg.mlp_bias, dtype=dtype, name="wi_1")(h)
        h = dropout(self, activation(cfg.hidden_activation)(gate_in) * gate, cfg.dropout_rate)
        return x_BxLxD + Dense(D, ("mlp", "embed"), use_bias=cfg.mlp_bias, dtype=dtype, name="wo")(h)


class ModernBertEncoder(nn.Module):
    """Token ids [B, L] -> final-norm hidden states [B, L, D]."""

    cfg: ModernBertConfig

    @nn.compact
    def __call__(self, input_ids_BxL: jax.Array, mask_BxL: jax.Array,
                 token_type_ids_BxL: jax.Array | None = None, exit_layers: tuple[int, ...] = ()) -> Any:
        """`exit_layers` (2D Matryoshka): returns `(hidden, [final_norm(state after each of those layer counts)])`."""
        del token_type_ids_BxL   # ModernBERT has no token types
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        norm = dict(eps=cfg.norm_eps, dtype=dtype, use_bias=cfg.norm_bias)
        x = Embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), name="token_embedder")(input_ids_BxL)
        x = _constrain(dropout(self, LayerNorm(name="embeddings_norm", **norm)(x), cfg.dropout_rate))
        exits = check_exits(exit_layers, cfg.num_hidden_layers)
        layer = layer_class(ModernBertLayer, cfg.remat)
        final_norm = LayerNorm(name="final_norm", **norm)
        states = []
        for i in range(cfg.num_hidden_layers):
            x = _constrain(layer(cfg, i, name=f"layer_{i}")(x, mask_BxL))
            if i + 1 in exits:
                states.append(final_norm(x))
        return (final_norm(x), states) if exits else final_norm(x)
