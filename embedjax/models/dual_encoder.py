"""Sentence-embedding model: encoder -> pooling -> optional projection -> optional L2 normalisation,
with shared or separate query / document towers.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import flax.linen as nn

from embedjax.models.bert import BertConfig, BertEncoder
from embedjax.models.layers import Dense, activation
from embedjax.models.modernbert import ModernBertConfig, ModernBertEncoder
from embedjax.models.t5 import T5Config, T5Encoder

POOLINGS = ("mean", "cls", "max", "mean_sqrt_len")
ARCHITECTURES = {"bert": (BertConfig, BertEncoder), "t5": (T5Config, T5Encoder),
                 "modernbert": (ModernBertConfig, ModernBertEncoder)}
Tower = Literal["query", "document"]


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    pooling: str = "mean"                 # mean | cls | max | mean_sqrt_len
    projection_dim: int | None = None     # None: no projection (Sentence-T5 uses 768, no bias)
    projection_bias: bool = False
    projection_activation: str = "identity"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r} is not supported; supported: {', '.join(POOLINGS)}")
        activation(self.projection_activation)  # validates


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build the Flax module; serialisable to JSON."""

    architecture: str                     # "bert" (BERT, RoBERTa, XLM-R, MPNet) | "t5" | "modernbert"
    encoder: BertConfig | T5Config | ModernBertConfig
    head: HeadConfig = HeadConfig()
    shared_towers: bool = True
    max_length: int = 512

    @property
    def embedding_dim(self) -> int:
        return self.head.projection_dim or self.encoder.hidden_dim

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "encoder": dataclasses.asdict(self.encoder),
                "head": dataclasses.asdict(self.head), "shared_towers": self.shared_towers,
                "max_length": self.max_length}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        arch = d["architecture"]
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
        enc_cls = ARCHITECTURES[arch][0]
        return cls(architecture=arch, encoder=enc_cls(**d["encoder"]), head=HeadConfig(**d.get("head", {})),
                   shared_towers=d.get("shared_towers", True), max_length=d.get("max_length", 512))


def pool(hidden_BxLxD: jax.Array, mask_BxL: jax.Array, mode: str) -> jax.Array:
    """Pools token states into one vector per sequence, ignoring padding (as sentence-transformers does)."""
    h = hidden_BxLxD.astype(jnp.float32)
    m = mask_BxL.astype(jnp.float32)[..., None]
    if mode == "cls":
        return h[:, 0]
    if mode == "max":
        return jnp.max(jnp.where(m > 0, h, -1e9), axis=1)
    summed = jnp.sum(h * m, axis=1)
    count = jnp.maximum(jnp.sum(m, axis=1), 1e-9)
    if mode == "mean":
        return summed / count
    if mode == "mean_sqrt_len":
        return summed / jnp.sqrt(count)
    raise ValueError(f"pooling {mode!r} is not supported; supported: {', '.join(POOLINGS)}")


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps), as torch.nn.functional.normalize. The square root is taken of max(||x||^2, eps^2)
    (the same value wherever it matters) so that an all-zero row, e.g. the embedding of an empty padding slot,
    gets a zero gradient instead of 0 * inf = NaN."""
    norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps * eps))
    return x / jnp.maximum(norm, eps)


class EmbeddingTower(nn.Module):
    """One tower: encoder + pooling + projection. Returns unnormalised embeddings [B, E]."""

    cfg: ModelConfig

    def setup(self) -> None:
        enc_cls = ARCHITECTURES[self.cfg.architecture][1]
        self.encoder = enc_cls(self.cfg.encoder)
        head = self.cfg.head
        if head.projection_dim:
            self.projection = Dense(head.projection_dim, ("embed", "proj"), use_bias=head.projection_bias,
                                    name="projection")

    def __call__(self, input_ids_BxL, mask_BxL, token_type_ids_BxL=None) -> jax.Array:
        hidden = self.encoder(input_ids_BxL, mask_BxL, token_type_ids_BxL)
        emb = pool(hidden, mask_BxL, self.cfg.head.pooling)
        if self.cfg.head.projection_dim:
            emb = activation(self.cfg.head.projection_activation)(self.projection(emb))
        return emb.astype(jnp.float32)


class DualEncoder(nn.Module):
    """Shared (params under 'tower') or separate ('query_tower', 'document_tower') towers."""

    cfg: ModelConfig

    def setup(self) -> None:
        if self.cfg.shared_towers:
            self.tower = EmbeddingTower(self.cfg)
        else:
            self.query_tower = EmbeddingTower(self.cfg)
            self.document_tower = EmbeddingTower(self.cfg)

    def __call__(self, input_ids_BxL, mask_BxL, token_type_ids_BxL=None, *, tower: Tower = "query",
                 normalize: bool | None = None) -> jax.Array:
        if self.cfg.shared_towers:
            t = self.tower
        elif tower == "query":
            t = self.query_tower
        elif tower == "document":
            t = self.document_tower
        else:
            raise ValueError(f"tower must be 'query' or 'document', got {tower!r}")
        emb = t(input_ids_BxL, mask_BxL, token_type_ids_BxL)
        if self.cfg.head.normalize if normalize is None else normalize:
            emb = l2_normalize(emb)
        return emb

    def init_both(self, input_ids_BxL, mask_BxL):
        """Touches every tower so `init` creates all params."""
        if self.cfg.shared_towers:
            return self.tower(input_ids_BxL, mask_BxL)
        return self.query_tower(input_ids_BxL, mask_BxL), self.document_tower(input_ids_BxL, mask_BxL)


def init_params(cfg: ModelConfig, rng: jax.Array, seq_len: int = 8) -> dict:
    """Randomly initialised params (boxed with logical axes stripped)."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    variables = DualEncoder(cfg).init(rng, ids, jnp.ones_like(ids), method=DualEncoder.init_both)
    return nn.meta.unbox(variables["params"])


def tower_params(cfg: ModelConfig, params: dict, tower: Tower = "query") -> dict:
    """The sub-tree of one tower."""
    if cfg.shared_towers:
        return params["tower"]
    return params[f"{tower}_tower"]
