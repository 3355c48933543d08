"""T5 encoder (T5 v1.0 ReLU; v1.1 / mT5 / Flan-T5 gated GELU): RMSNorm, pre-norm residuals, no biases,
relative position buckets computed once (by the first layer) and shared by every layer.

Numerically follows Hugging Face `T5EncoderModel` (eval mode).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn

from embedjax.models.layers import (Dense, Embed, RMSNorm, activation,
                                     masked_attention, RUNTIME_FIELDS, dropout, run_layers, scan_out)
from embedjax.sharding import ACTIVATION_BxLxD, logical_constraint


def _constrain(x_BxLxD):
    return logical_constraint(x_BxLxD, ACTIVATION_BxLxD)


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 12
    num_heads: int = 12
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"     # "relu" (v1.0) | "gated-gelu" (v1.1, mT5, Flan) | "gated-relu" ...
    pad_token_id: int = 0
    eos_token_id: int = 1
    model_type: str = "t5"                     # t5 | mt5
    dtype: str = "float32"
    dropout_rate: float = 0.0      # training only (a step given a "dropout" rng); see layers.dropout
    remat: str = "none"            # layers.REMAT_POLICIES
    param_dtype: str = "float32"   # dtype the trainer stores parameters (and so optimizer state) in
    scan_layers: bool = False      # layers.run_layers: one scanned layer stack instead of a loop

    @property
    def hidden_dim(self) -> int:
        return self.d_model

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def act_name(self) -> str:
        act = self.feed_forward_proj.split("-")[-1]
        # HF maps "gated-gelu" to the tanh approximation ("gelu_new").
        return "gelu_new" if act == "gelu" else act

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "T5Config":
        fields = {f.name for f in dataclasses.fields(cls)} - set(RUNTIME_FIELDS) - {"dtype"}
        kwargs = {k: cfg[k] for k in fields if k in cfg}
        if "feed_forward_proj" not in cfg:
            # transformers' own defaults: T5Config "relu" (t5-small ... t5-11b, v1.0, whose config.json files
            # have no such key), MT5Config "gated-gelu"
            kwargs["feed_forward_proj"] = "gated-gelu" if cfg.get("model_type") == "mt5" else "relu"
        if "num_layers" not in kwargs and "num_hidden_layers" in cfg:
            kwargs["num_layers"] = cfg["num_hidden_layers"]
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("dtype")
        for k in RUNTIME_FIELDS:
            d.pop(k)
        d.update(architectures=["T5EncoderModel"], is_encoder_decoder=False, dropout_rate=0.1,
                 num_decoder_layers=self.num_layers, decoder_start_token_id=self.pad_token_id,
                 tie_word_embeddings=self.model_type == "t5")
        return d


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 buckets [q_len, k_len], computed in numpy with HF's float32 arithmetic (static shapes)."""
    ctx = np.arange(q_len, dtype=np.int64)[:, None]
    mem = np.arange(k_len, dtype=np.int64)[None, :]
    rel = mem - ctx
    n = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * n
    rel = np.abs(rel)
    max_exact = n // 2
    is_small = rel < max_exact
    with np.errstate(divide="ignore"):
        large = (np.log(rel.astype(np.float32) / np.float32(max_exact))
                 / np.float32(math.log(max_distance / max_exact)) * np.float32(n - max_exact))
    large = max_exact + np.where(is_small, 0, large).astype(np.int64)
    large = np.minimum(large, n - 1)
    return buckets + np.where(is_small, rel, large)


class T5Layer(nn.Module):
    cfg: T5Config

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, mask_BxL: jax.Array, bias_1xHxLxL: jax.Array) -> jax.Array:
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        B, L, D = x_BxLxD.shape
        H, K = cfg.num_heads, cfg.d_kv
        h = RMSNorm(cfg.layer_norm_epsilon, dtype=dtype, name="attention_norm")(x_BxLxD)
        q = Dense(H * K, ("embed", "heads"), use_bias=False, dtype=dtype, name="query")(h).reshape(B, L, H, K)
        k = Dense(H * K, ("embed", "heads"), use_bias=False, dtype=dtype, name="key")(h).reshape(B, L, H, K)
        v = Dense(H * K, ("embed", "heads"), use_bias=False, dtype=dtype, name="value")(h).reshape(B, L, H, K)
        ctx = masked_attention(q, k, v, mask_BxL, scale=None, bias_1xHxLxL=bias_1xHxLxL).reshape(B, L, H * K)
        x_BxLxD = x_BxLxD + dropout(self, Dense(D, ("heads", "embed"), use_bias=False, dtype=dtype,
                                                name="attention_output")(ctx), cfg.dropout_rate)

        h = RMSNorm(cfg.layer_norm_epsilon, dtype=dtype, name="mlp_norm")(x_BxLxD)
        act = activation(cfg.act_name)
        if cfg.is_gated:
            g = act(Dense(cfg.d_ff, ("embed", "mlp"), use_bias=False, dtype=dtype, name="wi_0")(h))
            lin = Dense(cfg.d_ff, ("embed", "mlp"), use_bias=False, dtype=dtype, name="wi_1")(h)
            h = g * lin
        else:
            h = act(Dense(cfg.d_ff, ("embed", "mlp"), use_bias=False, dtype=dtype, name="wi")(h))
        return scan_out(cfg, _constrain(x_BxLxD + dropout(
            self, Dense(D, ("mlp", "embed"), use_bias=False, dtype=dtype, name="wo")(h), cfg.dropout_rate)))


class T5Encoder(nn.Module):
    """Token ids [B, L] -> final-norm hidden states [B, L, D]."""

    cfg: T5Config

    @nn.compact
    def __call__(self, input_ids_BxL: jax.Array, mask_BxL: jax.Array,
                 token_type_ids_BxL: jax.Array | None = None, exit_layers: tuple[int, ...] = ()) -> Any:
        """`exit_layers` (2D Matryoshka): returns `(hidden, [final_norm(state after each of those layer counts)])`."""
        del token_type_ids_BxL  # T5 has no token types
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        L = input_ids_BxL.shape[1]
        x_BxLxD = Embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), dtype=dtype,
                        embedding_init=nn.initializers.normal(1.0), name="token_embedder")(input_ids_BxL)
        x_BxLxD = _constrain(dropout(self, x_BxLxD, cfg.dropout_rate))
        rel_table = self.param("relative_attention_bias",
                               nn.with_logical_partitioning(nn.initializers.normal(1.0), ("pos", None)),
                               (cfg.relative_attention_num_buckets, cfg.num_heads), jnp.float32)
        buckets_LxL = relative_position_buckets(L, L, cfg.relative_attention_num_buckets,
                                                cfg.relative_attention_max_distance)
        bias_1xHxLxL = jnp.take(rel_table, jnp.asarray(buckets_LxL), axis=0).transpose(2, 0, 1)[None]
        out = run_layers(T5Layer, cfg, cfg.num_layers, x_BxLxD, mask_BxL, bias_1xHxLxL, exits=exit_layers)
        final_norm = RMSNorm(cfg.layer_norm_epsilon, dtype=dtype, name="final_norm")

        def finish(x):
            return dropout(self, final_norm(x), cfg.dropout_rate)
        if exit_layers:
            return finish(out[0]), [finish(x) for x in out[1]]
        return finish(out)
