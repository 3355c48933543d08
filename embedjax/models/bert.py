"""BERT-family encoder (BERT, MiniLM, BGE, E5, ...): absolute positions, token types, post-LayerNorm.

Numerically follows Hugging Face `BertModel` (eval mode) so converted checkpoints give the same hidden states.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from embedjax.models.layers import Dense, Embed, LayerNorm, activation, head_scale, masked_attention
from embedjax.sharding import ACTIVATION_BxLxD, logical_constraint


def _constrain(x_BxLxD):
    return logical_constraint(x_BxLxD, ACTIVATION_BxLxD)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    dtype: str = "float32"          # compute dtype; params stay float32

    @property
    def hidden_dim(self) -> int:
        return self.hidden_size

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "BertConfig":
        pos_type = cfg.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise ValueError(f"position_embedding_type {pos_type!r} is not supported (only 'absolute')")
        fields = {f.name for f in dataclasses.fields(cls)} - {"dtype"}
        return cls(**{k: cfg[k] for k in fields if k in cfg})

    def to_hf(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("dtype")
        d.update(model_type="bert", architectures=["BertModel"], position_embedding_type="absolute",
                 hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, initializer_range=0.02)
        return d


class BertLayer(nn.Module):
    cfg: BertConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, mask_BxL: jax.Array) -> jax.Array:
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        H = cfg.num_attention_heads
        K = cfg.hidden_size // H
        B, L, D = x_BxLxD.shape
        q = Dense(D, ("embed", "heads"), dtype=dtype, name="query")(x_BxLxD).reshape(B, L, H, K)
        k = Dense(D, ("embed", "heads"), dtype=dtype, name="key")(x_BxLxD).reshape(B, L, H, K)
        v = Dense(D, ("embed", "heads"), dtype=dtype, name="value")(x_BxLxD).reshape(B, L, H, K)
        ctx_BxLxD = masked_attention(q, k, v, mask_BxL, scale=head_scale(K)).reshape(B, L, D)
        attn_out = Dense(D, ("heads", "embed"), dtype=dtype, name="attention_output")(ctx_BxLxD)
        x_BxLxD = LayerNorm(cfg.layer_norm_eps, dtype=dtype, name="attention_norm")(attn_out + x_BxLxD)
        h_BxLxF = Dense(cfg.intermediate_size, ("embed", "mlp"), dtype=dtype, name="intermediate")(x_BxLxD)
        h_BxLxF = activation(cfg.hidden_act)(h_BxLxF)
        out = Dense(D, ("mlp", "embed"), dtype=dtype, name="output")(h_BxLxF)
        return LayerNorm(cfg.layer_norm_eps, dtype=dtype, name="output_norm")(out + x_BxLxD)


class BertEncoder(nn.Module):
    """Token ids [B, L] -> hidden states [B, L, D]."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, input_ids_BxL: jax.Array, mask_BxL: jax.Array,
                 token_type_ids_BxL: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        L = input_ids_BxL.shape[1]
        if token_type_ids_BxL is None:
            token_type_ids_BxL = jnp.zeros_like(input_ids_BxL)
        words = Embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), name="word_embeddings")(input_ids_BxL)
        pos = Embed(cfg.max_position_embeddings, cfg.hidden_size, ("pos", "embed"),
                    name="position_embeddings")(jnp.arange(L)[None, :])
        types = Embed(cfg.type_vocab_size, cfg.hidden_size, (None, "embed"),
                      name="token_type_embeddings")(token_type_ids_BxL)
        x_BxLxD = _constrain(LayerNorm(cfg.layer_norm_eps, dtype=dtype, name="embeddings_norm")(
            words + pos + types))
        for i in range(cfg.num_hidden_layers):
            x_BxLxD = _constrain(BertLayer(cfg, name=f"layer_{i}")(x_BxLxD, mask_BxL))
        return x_BxLxD
