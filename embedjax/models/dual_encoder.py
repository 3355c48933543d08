"""Sentence-embedding model: encoder -> pooling -> optional projection -> optional L2 normalisation,
with shared or separate query / document towers.

Poolings: mean, cls (the first position), max, mean_sqrt_len, lasttoken (each row's last non-padding token,
padding on either side: decoder-LLM embedders such as Qwen3-Embedding) and latent_attention (NV-Embed's trainable
latent-attention head, `LatentAttentionPooling`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import flax.linen as nn

from embedjax.models.bert import BertConfig, BertEncoder
from embedjax.models.decoder import DecoderConfig, DecoderEncoder
from embedjax.models.layers import Dense, LayerNorm, activation
from embedjax.models.modernbert import ModernBertConfig, ModernBertEncoder
from embedjax.models.t5 import T5Config, T5Encoder

POOLINGS = ("mean", "cls", "max", "mean_sqrt_len", "lasttoken", "latent_attention")
ARCHITECTURES = {"bert": (BertConfig, BertEncoder), "t5": (T5Config, T5Encoder),
                 "modernbert": (ModernBertConfig, ModernBertEncoder), "decoder": (DecoderConfig, DecoderEncoder)}
_LATENT_FIELDS = ("latent_num", "latent_heads", "latent_mlp_dim")
Tower = Literal["query", "document"]


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    pooling: str = "mean"                 # mean | cls | max | mean_sqrt_len | lasttoken | latent_attention
    projection_dim: int | None = None     # None: no projection (Sentence-T5 uses 768, no bias)
    projection_bias: bool = False
    projection_activation: str = "identity"
    normalize: bool = True
    # latent_attention pooling (NV-Embed: 512 latents, 8 heads): the latent array's rows, the attention heads
    # (they divide the hidden size) and the MLP's hidden width (None: 4 x the hidden size)
    latent_num: int = 512
    latent_heads: int = 8
    latent_mlp_dim: int | None = None

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r} is not supported; supported: {', '.join(POOLINGS)}")
        activation(self.projection_activation)  # validates
        for name in _LATENT_FIELDS:
            v = getattr(self, name)
            if not (v is None and name == "latent_mlp_dim") and (isinstance(v, bool) or not isinstance(v, int)
                                                                 or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.pooling != "latent_attention":
            changed = [n for n in _LATENT_FIELDS if getattr(self, n) != HeadConfig.__dataclass_fields__[n].default]
            if changed:
                raise ValueError(f"{changed[0]} is a setting of pooling 'latent_attention', not of "
                                 f"{self.pooling!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build the Flax module; serialisable to JSON."""

    architecture: str                     # "bert" (BERT, RoBERTa, XLM-R, MPNet) | "t5" | "modernbert" | "decoder"
    encoder: BertConfig | T5Config | ModernBertConfig | DecoderConfig
    head: HeadConfig = HeadConfig()
    shared_towers: bool = True
    max_length: int = 512

    def __post_init__(self) -> None:
        head = self.head
        if head.pooling == "latent_attention" and self.encoder.hidden_dim % head.latent_heads:
            raise ValueError(f"latent_heads {head.latent_heads} does not divide the encoder's hidden size "
                             f"{self.encoder.hidden_dim}")

    @property
    def embedding_dim(self) -> int:
        return self.head.projection_dim or self.encoder.hidden_dim

    def to_dict(self) -> dict[str, Any]:
        head = dataclasses.asdict(self.head)
        if self.head.pooling != "latent_attention":   # (so other models' configs and fingerprints are unchanged)
            for name in _LATENT_FIELDS:
                head.pop(name)
        return {"architecture": self.architecture, "encoder": dataclasses.asdict(self.encoder),
                "head": head, "shared_towers": self.shared_towers, "max_length": self.max_length}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        arch = d["architecture"]
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
        enc_cls = ARCHITECTURES[arch][0]
        return cls(architecture=arch, encoder=enc_cls(**d["encoder"]), head=HeadConfig(**d.get("head", {})),
                   shared_towers=d.get("shared_towers", True), max_length=d.get("max_length", 512))


def pool(hidden_BxLxD: jax.Array, mask_BxL: jax.Array, mode: str) -> jax.Array:
    """Pools token states into one vector per sequence, ignoring padding (as sentence-transformers does).
    "lasttoken": the state at each row's last position where the mask is 1, wherever the padding is (left or
    right); a row without any token pools to zeros (sentence-transformers' Pooling does the same)."""
    h = hidden_BxLxD.astype(jnp.float32)
    m = mask_BxL.astype(jnp.float32)[..., None]
    if mode == "cls":
        return h[:, 0]
    if mode == "lasttoken":
        L = h.shape[1]
        present_BxL = mask_BxL > 0
        last_B = L - 1 - jnp.argmax(present_BxL[:, ::-1], axis=1)
        out_BxD = jnp.take_along_axis(h, last_B[:, None, None], axis=1)[:, 0]
        return jnp.where(jnp.any(present_BxL, axis=1)[:, None], out_BxD, 0.0)
    if mode == "latent_attention":
        raise ValueError("pooling 'latent_attention' has parameters: it is applied by EmbeddingTower "
                         "(LatentAttentionPooling), not by pool()")
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


class LatentAttentionPooling(nn.Module):
    """NV-Embed's latent-attention pooling (Lee et al. 2024, "NV-Embed", section 3.2), a trainable head: each
    token state attends (as the query) to a learned latent array (keys and values), O = softmax(Q K^T) V with
    `latent_heads` heads, followed by an MLP with a GELU; then masked mean pooling. Laid out as NV-Embed's
    released `LatentAttentionModel`: LayerNorms before the attention (on tokens and latents) and before the MLP,
    query / key / value / output projections without bias, residual connections around both; its MLP here is
    the paper's two linear maps with a GELU between (`latent_mlp_dim` wide). Tokens never attend to each other,
    so padding enters only through the (masked) mean. The output projections start near zero, so a new head
    starts close to mean pooling."""

    head: HeadConfig

    @nn.compact
    def __call__(self, hidden_BxLxD: jax.Array, mask_BxL: jax.Array) -> jax.Array:
        head = self.head
        x_BxLxD = hidden_BxLxD.astype(jnp.float32)
        B, L, D = x_BxLxD.shape
        R, H = head.latent_num, head.latent_heads
        K = D // H
        latents_RxD = self.param("latents", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                         ("latents", "embed")), (R, D), jnp.float32)
        h_BxLxD = LayerNorm(1e-5, name="query_norm")(x_BxLxD)
        c_RxD = LayerNorm(1e-5, name="latent_norm")(latents_RxD)
        q_BxLxHxK = Dense(D, ("embed", "heads"), use_bias=False, name="query")(h_BxLxD).reshape(B, L, H, K)
        k_RxHxK = Dense(D, ("embed", "heads"), use_bias=False, name="key")(c_RxD).reshape(R, H, K)
        v_RxHxK = Dense(D, ("embed", "heads"), use_bias=False, name="value")(c_RxD).reshape(R, H, K)
        probs_BxHxLxR = jax.nn.softmax(jnp.einsum("blhk,rhk->bhlr", q_BxLxHxK, k_RxHxK) / jnp.sqrt(K), axis=-1)
        o_BxLxD = jnp.einsum("bhlr,rhk->blhk", probs_BxHxLxR, v_RxHxK).reshape(B, L, D)
        x_BxLxD = x_BxLxD + Dense(D, ("heads", "embed"), use_bias=False, name="attention_output")(o_BxLxD)
        h_BxLxD = LayerNorm(1e-5, name="mlp_norm")(x_BxLxD)
        h_BxLxF = activation("gelu")(Dense(head.latent_mlp_dim or 4 * D, ("embed", "mlp"), name="wi")(h_BxLxD))
        x_BxLxD = x_BxLxD + Dense(D, ("mlp", "embed"), name="wo")(h_BxLxF)
        return pool(x_BxLxD, mask_BxL, "mean")


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
        if head.pooling == "latent_attention":
            self.latent_attention = LatentAttentionPooling(head)

    def _pool(self, hidden_BxLxD, mask_BxL) -> jax.Array:
        if self.cfg.head.pooling == "latent_attention":
            return self.latent_attention(hidden_BxLxD, mask_BxL)
        return pool(hidden_BxLxD, mask_BxL, self.cfg.head.pooling)

    def __call__(self, input_ids_BxL, mask_BxL, token_type_ids_BxL=None, exit_layers: tuple[int, ...] = ()) -> Any:
        """`exit_layers` (2D Matryoshka): a list, the full model's embeddings then those of the states after each
        of these layer counts (pooled and projected alike)."""
        if exit_layers:
            hidden, states = self.encoder(input_ids_BxL, mask_BxL, token_type_ids_BxL, exit_layers=exit_layers)
            return [self.head(h, mask_BxL) for h in [hidden, *states]]
        return self.head(self.encoder(input_ids_BxL, mask_BxL, token_type_ids_BxL), mask_BxL)

    def head(self, hidden_BxLxD, mask_BxL) -> jax.Array:
        emb = self._pool(hidden_BxLxD, mask_BxL)
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
                 normalize: bool | None = None, exit_layers: tuple[int, ...] = ()) -> jax.Array:
        """Embeddings [B, E]. `exit_layers` (2D Matryoshka training): [B, E * (1 + len(exit_layers))], the full
        model's embeddings then those after each of these layer counts, each part normalised on its own
        (`split_exits` takes them apart)."""
        if self.cfg.shared_towers:
            t = self.tower
        elif tower == "query":
            t = self.query_tower
        elif tower == "document":
            t = self.document_tower
        else:
            raise ValueError(f"tower must be 'query' or 'document', got {tower!r}")
        norm = self.cfg.head.normalize if normalize is None else normalize
        if exit_layers:
            parts = t(input_ids_BxL, mask_BxL, token_type_ids_BxL, exit_layers=tuple(exit_layers))
            return jnp.concatenate([l2_normalize(e) if norm else e for e in parts], axis=-1)
        emb = t(input_ids_BxL, mask_BxL, token_type_ids_BxL)
        if norm:
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


def split_exits(emb: jax.Array, n_exits: int) -> list[jax.Array]:
    """`DualEncoder(..., exit_layers=...)`'s output -> [full, after exit 1, ...], each [..., E]."""
    return jnp.split(emb, n_exits + 1, axis=-1) if n_exits else [emb]


def num_layers(cfg: ModelConfig) -> int:
    enc = cfg.encoder
    return int(getattr(enc, "num_hidden_layers", None) or enc.num_layers)


def truncate_layers(cfg: ModelConfig, params: dict, layers: int) -> tuple[ModelConfig, dict]:
    """The sub-network of the first `layers` encoder layers (2D Matryoshka): (config, params), the params a
    subset of `params` (no copy). Pre-norm encoders (T5, ModernBERT) keep their final norm after the last kept
    layer, as the model's `exit_layers` states have it."""
    n = num_layers(cfg)
    if not 1 <= int(layers) <= n:
        raise ValueError(f"layers must be in [1, {n}] (the model has {n} layers), got {layers}")
    layers = int(layers)
    if layers == n:
        return cfg, params
    enc = cfg.encoder
    if hasattr(enc, "num_hidden_layers"):
        kw: dict[str, Any] = {"num_hidden_layers": layers}
        if hasattr(enc, "layer_types"):
            kw["layer_types"] = tuple(enc.layer_types[:layers])
    else:
        kw = {"num_layers": layers}
    sub_cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(enc, **kw))

    def cut(encoder: dict) -> dict:
        if "layers" in encoder:   # scanned: a leading layer axis
            return {k: (jax.tree.map(lambda x: x[:layers], v) if k == "layers" else v) for k, v in encoder.items()}
        return {k: v for k, v in encoder.items()
                if not (k.startswith("layer_") and k[6:].isdigit() and int(k[6:]) >= layers)}
    towers = {name: dict(t, encoder=cut(t["encoder"])) for name, t in params.items()}
    return sub_cfg, towers
