"""BERT-family encoder (BERT, MiniLM, BGE, E5, ...; RoBERTa and XLM-RoBERTa: multilingual-e5, bge-m3):
absolute positions, token types, post-LayerNorm.

Numerically follows Hugging Face `BertModel` / `RobertaModel` / `XLMRobertaModel` (eval mode) so converted
checkpoints give the same hidden states. RoBERTa's one difference in the encoder is where positions start: at
``pad_token_id + 1``, counted over the non-padding tokens only (`position_offset`). MPNet (all-mpnet-base-v2) is
the same encoder with RoBERTa's positions, no token types, and a T5-style relative position bias (32 buckets,
max distance 128) computed once and added to every layer's attention logits (`relative_attention_num_buckets`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from embedjax.models.layers import (Dense, Embed, LayerNorm, activation,
                                     head_scale, masked_attention, RUNTIME_FIELDS, dropout, run_layers, scan_out)
from embedjax.models.t5 import relative_position_buckets
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
    model_type: str = "bert"        # bert | roberta | xlm-roberta (the config.json it came from / goes to)
    position_offset: int = 0        # RoBERTa: pad_token_id + 1 (positions of real tokens start there)
    relative_attention_num_buckets: int = 0   # MPNet: 32 (a learned [buckets, heads] bias table)
    dtype: str = "float32"          # compute dtype (parameters: param_dtype)
    dropout_rate: float = 0.0      # training only (a step given a "dropout" rng); see layers.dropout
    remat: str = "none"            # layers.REMAT_POLICIES
    param_dtype: str = "float32"   # dtype the trainer stores parameters (and so optimizer state) in
    scan_layers: bool = False      # layers.run_layers: one scanned layer stack instead of a loop

    @property
    def hidden_dim(self) -> int:
        return self.hidden_size

    @property
    def max_positions(self) -> int:
        """Longest input the position table allows (RoBERTa's first `position_offset` rows are never used)."""
        return self.max_position_embeddings - self.position_offset

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "BertConfig":
        pos_type = cfg.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise ValueError(f"position_embedding_type {pos_type!r} is not supported (only 'absolute')")
        fields = {f.name for f in dataclasses.fields(cls)} - set(RUNTIME_FIELDS) - {"dtype", "position_offset",
                                                              "relative_attention_num_buckets"}
        kw = {k: cfg[k] for k in fields if k in cfg}
        if cfg.get("model_type") in ("roberta", "xlm-roberta"):
            kw["pad_token_id"] = int(cfg.get("pad_token_id", 1))
            kw["position_offset"] = kw["pad_token_id"] + 1
        if cfg.get("model_type") == "mpnet":
            buckets = int(cfg.get("relative_attention_num_buckets", 32))
            if buckets != 32:   # transformers' MPNet computes 32 buckets whatever the table size
                raise ValueError(f"MPNet relative_attention_num_buckets {buckets} is not supported (only 32)")
            kw.update(pad_token_id=1, position_offset=2, type_vocab_size=0, relative_attention_num_buckets=32,
                      layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)))
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("dtype")
        for k in RUNTIME_FIELDS:
            d.pop(k)
        d.pop("position_offset")
        if self.model_type != "mpnet":
            d.pop("relative_attention_num_buckets")
        else:
            d.pop("type_vocab_size")
        arch = {"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel",
                "mpnet": "MPNetModel"}[self.model_type]
        d.update(architectures=[arch], position_embedding_type="absolute",
                 hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, initializer_range=0.02)
        return d


class BertLayer(nn.Module):
    cfg: BertConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, mask_BxL: jax.Array, bias_1xHxLxL: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        H = cfg.num_attention_heads
        K = cfg.hidden_size // H
        B, L, D = x_BxLxD.shape
        q = Dense(D, ("embed", "heads"), dtype=dtype, name="query")(x_BxLxD).reshape(B, L, H, K)
        k = Dense(D, ("embed", "heads"), dtype=dtype, name="key")(x_BxLxD).reshape(B, L, H, K)
        v = Dense(D, ("embed", "heads"), dtype=dtype, name="value")(x_BxLxD).reshape(B, L, H, K)
        ctx_BxLxD = masked_attention(q, k, v, mask_BxL, scale=head_scale(K), bias_1xHxLxL=bias_1xHxLxL
                                     ).reshape(B, L, D)
        attn_out = dropout(self, Dense(D, ("heads", "embed"), dtype=dtype, name="attention_output")(ctx_BxLxD),
                           cfg.dropout_rate)
        x_BxLxD = LayerNorm(cfg.layer_norm_eps, dtype=dtype, name="attention_norm")(attn_out + x_BxLxD)
        h_BxLxF = Dense(cfg.intermediate_size, ("embed", "mlp"), dtype=dtype, name="intermediate")(x_BxLxD)
        h_BxLxF = activation(cfg.hidden_act)(h_BxLxF)
        out = dropout(self, Dense(D, ("mlp", "embed"), dtype=dtype, name="output")(h_BxLxF), cfg.dropout_rate)
        return scan_out(cfg, _constrain(LayerNorm(cfg.layer_norm_eps, dtype=dtype, name="output_norm")(out + x_BxLxD)))


class BertEncoder(nn.Module):
    """Token ids [B, L] -> hidden states [B, L, D]."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, input_ids_BxL: jax.Array, mask_BxL: jax.Array,
                 token_type_ids_BxL: jax.Array | None = None, exit_layers: tuple[int, ...] = ()) -> Any:
        """`exit_layers` (2D Matryoshka): returns `(hidden, [hidden after each of those layer counts])`."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        L = input_ids_BxL.shape[1]
        if token_type_ids_BxL is None:
            token_type_ids_BxL = jnp.zeros_like(input_ids_BxL)
        words = Embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), name="word_embeddings")(input_ids_BxL)
        if cfg.position_offset:   # RoBERTa: real tokens count from the offset, padding sits at pad_token_id
            m = mask_BxL.astype(jnp.int32)
            pos_ids = jnp.cumsum(m, axis=1) * m + cfg.pad_token_id
        else:
            pos_ids = jnp.arange(L)[None, :]
        pos = Embed(cfg.max_position_embeddings, cfg.hidden_size, ("pos", "embed"),
                    name="position_embeddings")(pos_ids)
        x_BxLxD = words + pos
        if cfg.type_vocab_size:   # MPNet has no token types
            x_BxLxD = x_BxLxD + Embed(cfg.type_vocab_size, cfg.hidden_size, (None, "embed"),
                                      name="token_type_embeddings")(token_type_ids_BxL)
        x_BxLxD = _constrain(dropout(self, LayerNorm(cfg.layer_norm_eps, dtype=dtype, name="embeddings_norm")(x_BxLxD),
                                     cfg.dropout_rate))
        bias = None
        if cfg.relative_attention_num_buckets:   # MPNet: one relative position bias shared by every layer
            table = self.param("relative_attention_bias",
                               nn.with_logical_partitioning(nn.initializers.normal(0.02), ("pos", None)),
                               (cfg.relative_attention_num_buckets, cfg.num_attention_heads), jnp.float32)
            buckets_LxL = relative_position_buckets(L, L, cfg.relative_attention_num_buckets, 128)
            bias = jnp.transpose(table[buckets_LxL], (2, 0, 1))[None]
        return run_layers(BertLayer, cfg, cfg.num_hidden_layers, x_BxLxD, mask_BxL, bias, exits=exit_layers)
