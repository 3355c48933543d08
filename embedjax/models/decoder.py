"""Decoder-LLM backbones as text encoders: Qwen3 (Qwen3-Embedding starts from it) and Gemma 3 text
(EmbeddingGemma). Token ids [B, L] -> final-norm hidden states [B, L, D], pooled by the head (mean, or the last
token for causal models).

Both are pre-norm decoder stacks with RMSNorm, grouped-query attention (`num_key_value_heads` key / value heads
shared by groups of query heads), an RMSNorm on each query and key head, rotary positions and a gated MLP:

  qwen3        SiLU gate; scale head_dim^-1/2; one rotary base; optional sliding windows (`use_sliding_window`)
  gemma3_text  GELU (tanh) gate; embeddings times sqrt(hidden_size); RMSNorm as (1 + weight); a norm after
               attention and after the MLP too; scale query_pre_attn_scalar^-1/2; per layer `layer_types`
               full_attention (rotary base `rope_theta`) or sliding_attention (`rope_local_base_freq`, a window)

`attention` is "causal" (the language model's own masks) or "bidirectional" (every text token sees every other,
what EmbeddingGemma's `use_bidirectional_attention` asks for). Numerically follows transformers 5's
`Qwen3Model` / `Gemma3TextModel` called as sentence-transformers calls them, `model(input_ids, attention_mask)`:
positions 0 .. L-1 whatever the padding (transformers does not shift them for left padding), and padding keys
masked. Rotary attention depends only on the distance between positions, so a text's states (at its own
positions) are the same whether the batch is padded on the left or on the right.

Sliding windows, as transformers builds them (`sliding_window` is the config.json value, W):
  causal                          a query at i sees keys i - W + 1 .. i (W tokens, itself included)
  gemma3_text, bidirectional      keys within distance W // 2 either side (transformers stores W // 2 + 1 and
                                  keeps distances below it)
  qwen3, bidirectional            keys within distance W either side (masking_utils' bidirectional window)

Generation (`embedjax.generate`): `DecoderLM` adds the language-model head (tied to the embedding table or
`lm_head`, Gemma 3's final-logit soft-capping) and takes per-row positions and a `KVCache`; the masks stay
index-based, so decoding one slot at a time computes what one pass over the whole sequence computes.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from embedjax.models.layers import (Dense, Embed, RMSNorm, activation, cached_attention, check_exits, dropout,
                                     layer_class, masked_attention, rotary, run_layers, scan_out)
from embedjax.sharding import ACTIVATION_BxLxD, logical_constraint

_FULL, _SLIDING = "full_attention", "sliding_attention"
MODEL_TYPES = ("qwen3", "gemma3_text")
ATTENTION_MODES = ("causal", "bidirectional")

# transformers' defaults for keys a config.json may leave out (Qwen3Config / Gemma3TextConfig in transformers 5)
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, head_dim=128, hidden_act="silu",
                  max_position_embeddings=32768, rms_norm_eps=1e-6, attention_bias=False, tie_word_embeddings=False,
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28, rope_theta=10_000.0,
                  pad_token_id=None, bos_token_id=None, eos_token_id=None),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072, rms_norm_eps=1e-6,
                        attention_bias=False, tie_word_embeddings=True, query_pre_attn_scalar=256,
                        sliding_window=4096, sliding_window_pattern=6, rope_theta=1_000_000.0,
                        rope_local_base_freq=10_000.0, pad_token_id=0, eos_token_id=1, bos_token_id=2),
}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    model_type: str = "qwen3"                  # qwen3 | gemma3_text
    vocab_size: int = 151936                   # defaults: Qwen/Qwen3-0.6B
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"                   # gemma3_text: its hidden_activation
    max_position_embeddings: int = 40960
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    rope_theta: float = 1_000_000.0            # rotary base of full-attention layers (qwen3: of every layer)
    rope_local_theta: float = 10_000.0         # gemma3_text: rotary base of sliding layers (rope_local_base_freq)
    sliding_window: int | None = None          # the config.json value (see the module docstring)
    layer_types: tuple[str, ...] = ()          # per layer full_attention | sliding_attention; () = the default
    query_pre_attn_scalar: float | None = None  # gemma3_text: attention scale query_pre_attn_scalar^-1/2 (None: 256)
    final_logit_softcapping: float | None = None  # gemma3_text: on the LM head's logits only (`DecoderLM`;
                                                  # the embedding encoder has no LM head)
    attention: str = "causal"                  # causal | bidirectional
    tie_word_embeddings: bool = True           # the LM head (`DecoderLM`) shares the embedding table
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    dtype: str = "float32"
    dropout_rate: float = 0.0      # training only (a step given a "dropout" rng); see layers.dropout
    remat: str = "none"            # layers.REMAT_POLICIES
    param_dtype: str = "float32"   # dtype the trainer stores parameters (and so optimizer state) in
    scan_layers: bool = False      # layers.run_layers; only when every layer has one type (see __post_init__)

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not a decoder embedjax supports; supported: "
                             f"{', '.join(MODEL_TYPES)}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {self.attention!r}")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if not self.layer_types:
            n = self.num_hidden_layers
            types = ([_SLIDING if (i + 1) % 6 else _FULL for i in range(n)] if self.is_gemma else [_FULL] * n)
            object.__setattr__(self, "layer_types", tuple(types))
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        bad = sorted(set(self.layer_types) - {_FULL, _SLIDING})
        if bad or len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types must name {self.num_hidden_layers} layers as {_FULL} / {_SLIDING}, "
                             f"got {list(self.layer_types)}")
        if _SLIDING in self.layer_types and not (self.sliding_window and self.sliding_window >= 1):
            raise ValueError(f"layer_types has {_SLIDING} layers but sliding_window is {self.sliding_window!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if not self.is_gemma and self.query_pre_attn_scalar is not None:
            raise ValueError("query_pre_attn_scalar is a gemma3_text setting; qwen3 scales by head_dim^-1/2")
        if not self.is_gemma and self.final_logit_softcapping is not None:
            raise ValueError("final_logit_softcapping is a gemma3_text setting")
        activation(self.hidden_act)   # validates
        if self.scan_layers and len(set(self.layer_types)) > 1:
            raise ValueError("scan_layers is not supported for a decoder whose layers differ (full and sliding "
                             "attention, each with its own rotary base and window); set scan_layers=False")

    @property
    def is_gemma(self) -> bool:
        return self.model_type == "gemma3_text"

    @property
    def hidden_dim(self) -> int:
        return self.hidden_size

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings

    @property
    def attention_scale(self) -> float:
        if self.is_gemma:
            return float(self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else 256) ** -0.5
        return self.head_dim ** -0.5

    @property
    def window(self) -> int | None:
        """`masked_attention`'s window of the sliding layers (see the module docstring)."""
        if self.sliding_window is None:
            return None
        if self.attention == "causal":
            return self.sliding_window - 1
        return self.sliding_window // 2 if self.is_gemma else self.sliding_window

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "DecoderConfig":
        """A Hugging Face config.json (transformers 5 layout, or the older one with rope_theta / rope_scaling at
        the top). Settings that would change what the model computes and that embedjax does not implement
        are refused, naming the key."""
        mt = cfg.get("model_type")
        if mt not in MODEL_TYPES:
            raise ValueError(f"model_type {mt!r} is not a decoder embedjax supports; supported: "
                             f"{', '.join(MODEL_TYPES)}")
        c = {**_HF_DEFAULTS[mt], **cfg}   # what transformers fills in for absent keys
        for key in ("rope_scaling", "partial_rotary_factor", "attn_logit_softcapping"):
            if cfg.get(key) is not None:
                why = (" (transformers' Gemma3 stores it and never applies it; the original Gemma applies it, so "
                       "the checkpoint's meaning is ambiguous)" if key == "attn_logit_softcapping" else "")
                raise ValueError(f"{key} {cfg[key]!r} is not supported{why}")
        n = int(c["num_hidden_layers"])
        heads = int(c["num_attention_heads"])
        kw: dict[str, Any] = dict(
            model_type=mt, vocab_size=int(c["vocab_size"]), hidden_size=int(c["hidden_size"]),
            intermediate_size=int(c["intermediate_size"]), num_hidden_layers=n, num_attention_heads=heads,
            num_key_value_heads=int(c["num_key_value_heads"] or heads),
            head_dim=int(c["head_dim"] or int(c["hidden_size"]) // heads),
            max_position_embeddings=int(c["max_position_embeddings"]), rms_norm_eps=float(c["rms_norm_eps"]),
            attention_bias=bool(c["attention_bias"]), tie_word_embeddings=bool(c["tie_word_embeddings"]),
            pad_token_id=c.get("pad_token_id"), bos_token_id=c.get("bos_token_id"), eos_token_id=c.get("eos_token_id"))
        if mt == "qwen3":
            if cfg.get("is_causal") is False:   # transformers' "power feature": bidirectional masks, every model
                kw["attention"] = "bidirectional"
            kw["hidden_act"] = c["hidden_act"]
            window = int(c["sliding_window"]) if c["use_sliding_window"] and c["sliding_window"] else None
            types = cfg.get("layer_types") or [
                _SLIDING if window is not None and i >= int(c["max_window_layers"]) else _FULL for i in range(n)]
            if _SLIDING in types and window is None:
                raise ValueError("layer_types has sliding_attention layers but use_sliding_window is false (or "
                                 "sliding_window is null): transformers has no window for them")
            kw.update(sliding_window=window, layer_types=tuple(types), rope_theta=_rope_theta(cfg, c, None))
            kw["rope_local_theta"] = kw["rope_theta"]
        else:
            if cfg.get("is_causal") is False:
                raise ValueError("is_causal=false on gemma3_text is not supported (transformers then mixes two "
                                 "window conventions); use use_bidirectional_attention=true")
            if cfg.get("use_bidirectional_attention"):
                kw["attention"] = "bidirectional"
            kw["hidden_act"] = c["hidden_activation"]
            pattern = int(c["sliding_window_pattern"])
            types = cfg.get("layer_types") or [_SLIDING if (i + 1) % pattern else _FULL for i in range(n)]
            sw = c["sliding_window"]
            if c["query_pre_attn_scalar"] is None:
                raise ValueError("query_pre_attn_scalar is null (transformers' Gemma3 scales by it)")
            kw.update(sliding_window=None if sw is None else int(sw), layer_types=tuple(types),
                      query_pre_attn_scalar=c["query_pre_attn_scalar"],
                      final_logit_softcapping=cfg.get("final_logit_softcapping"),
                      rope_theta=_rope_theta(cfg, c, _FULL), rope_local_theta=_rope_theta(cfg, c, _SLIDING))
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """A config.json that transformers builds the same model from (`Qwen3Model` / `Gemma3TextModel`)."""
        d: dict[str, Any] = dict(
            model_type=self.model_type, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps, attention_bias=self.attention_bias, layer_types=list(self.layer_types),
            tie_word_embeddings=self.tie_word_embeddings, pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id)
        if self.is_gemma:
            scalar = self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else 256
            d.update(architectures=["Gemma3TextModel"], hidden_activation=self.hidden_act,
                     # an int where it is one: transformers' strict config refuses 256.0
                     query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
                     sliding_window=self.sliding_window,
                     final_logit_softcapping=self.final_logit_softcapping, attn_logit_softcapping=None,
                     use_bidirectional_attention=self.attention == "bidirectional",
                     rope_parameters={_FULL: {"rope_type": "default", "rope_theta": self.rope_theta},
                                      _SLIDING: {"rope_type": "default", "rope_theta": self.rope_local_theta}})
        else:
            sliding = [i for i, t in enumerate(self.layer_types) if t == _SLIDING]
            d.update(architectures=["Qwen3Model"], hidden_act=self.hidden_act,
                     use_sliding_window=bool(sliding), sliding_window=self.sliding_window,
                     max_window_layers=sliding[0] if sliding else self.num_hidden_layers,
                     rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta})
            if self.attention == "bidirectional":
                d["is_causal"] = False
        return d


def _rope_theta(cfg: dict[str, Any], c: dict[str, Any], layer_type: str | None) -> float:
    """The rotary base of one layer type (qwen3: None, one flat `rope_parameters`), refusing any other rope_type
    or extra rope setting (scaling, partial rotation)."""
    rope = cfg.get("rope_parameters") or {}
    where = "rope_parameters"
    if layer_type is not None:
        extra = sorted(set(rope) - {_FULL, _SLIDING})
        if extra:
            raise ValueError(f"rope_parameters: keys {extra} are not supported (gemma3_text keeps one entry per "
                             f"layer type: {_FULL}, {_SLIDING})")
        rope, where = rope.get(layer_type) or {}, f"rope_parameters.{layer_type}"
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{where}: rope_type {rope_type!r} is not supported (only 'default')")
    extra = sorted(set(rope) - {"rope_type", "type", "rope_theta"})
    if extra:
        raise ValueError(f"{where}: {', '.join(extra)} not supported (only rope_theta with rope_type 'default')")
    if "rope_theta" in rope:
        return float(rope["rope_theta"])
    legacy = "rope_local_base_freq" if layer_type == _SLIDING else "rope_theta"
    return float(c[legacy])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer for causal decoding: `layers[i]` = (k [B, G, T, K], v [B, G, T, K]) over T
    slots (heads before slots: each step's attention reads every row's and head's slots as one contiguous block,
    where a [B, T, G, K] cache had XLA on CPU transpose the whole cache in every layer at every step); `mask` [B, T]
    is 1 at the slots that hold a real token (the prompt's and those decoded so far, this step's included); `index`
    is the slot of the first token of this call (0 for the prompt, then one slot per decoded token). Every row
    writes the same slots (prompts are left-padded to a common length), so one `dynamic_update_slice` writes a step.
    Every layer keeps all T slots: sliding-window layers mask the keys outside their window rather than keeping a
    ring buffer (simpler, more memory)."""

    layers: tuple[tuple[jax.Array, jax.Array], ...]
    mask: jax.Array
    index: jax.Array
    layer: int = dataclasses.field(default=0, metadata=dict(static=True))   # which entry a DecoderLayer reads

    @classmethod
    def zeros(cls, cfg: DecoderConfig, batch: int, slots: int, dtype: Any = None) -> "KVCache":
        shape = (batch, cfg.num_key_value_heads, slots, cfg.head_dim)
        dt = jnp.dtype(dtype or cfg.dtype)
        layers = tuple((_constrain_cache(jnp.zeros(shape, dt)), _constrain_cache(jnp.zeros(shape, dt)))
                       for _ in range(cfg.num_hidden_layers))
        return cls(layers=layers, mask=jnp.zeros((batch, slots), jnp.int32), index=jnp.zeros((), jnp.int32))


def _constrain_cache(x_BxGxTxK):
    return logical_constraint(x_BxGxTxK, ("activation_batch", None, "activation_length", None))


def _constrain(x_BxLxD):
    return logical_constraint(x_BxLxD, ACTIVATION_BxLxD)


class DecoderLayer(nn.Module):
    cfg: DecoderConfig
    layer_type: str = ""   # "" (scanned layers): the one type of every layer

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, mask_BxL: jax.Array, positions_BxL: jax.Array | None = None,
                 kv: KVCache | None = None) -> Any:
        """`positions_BxL`: rotary positions per row (None: 0 .. L-1 for every row, as transformers' forward).
        `kv` (causal decoding, see `KVCache`): this layer's keys and values are written into the cache at
        `kv.index` and the queries attend over the cache; returns (states, the layer's updated (k, v))."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        B, L, D = x_BxLxD.shape
        H, G, K = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        sliding = (self.layer_type or cfg.layer_types[0]) == _SLIDING

        def norm(name):
            return RMSNorm(cfg.rms_norm_eps, dtype=dtype, zero_centered=cfg.is_gemma, name=name)

        def dense(features, axes, name, bias=cfg.attention_bias):
            return Dense(features, axes, use_bias=bias, dtype=dtype, name=name)

        h = norm("attention_norm")(x_BxLxD)
        q_BxLxHxK = norm("query_norm")(dense(H * K, ("embed", "heads"), "query")(h).reshape(B, L, H, K))
        k_BxLxGxK = norm("key_norm")(dense(G * K, ("embed", "heads"), "key")(h).reshape(B, L, G, K))
        v_BxLxGxK = dense(G * K, ("embed", "heads"), "value")(h).reshape(B, L, G, K)
        # static, and not shifted for left padding (as transformers' forward), unless given
        positions = np.arange(L) if positions_BxL is None else positions_BxL
        theta = cfg.rope_local_theta if sliding else cfg.rope_theta
        q_BxLxHxK, k_BxLxGxK = rotary(q_BxLxHxK, positions, theta), rotary(k_BxLxGxK, positions, theta)
        window = cfg.window if sliding else None
        if kv is None:
            ctx = masked_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask_BxL, scale=cfg.attention_scale,
                                   window=window, causal=cfg.attention == "causal")
            new_kv = None
        else:
            if cfg.attention != "causal":
                raise ValueError("a key / value cache needs causal attention (this decoder is bidirectional)")
            k_cache, v_cache = kv.layers[kv.layer]
            at = (0, 0, kv.index, 0)
            k_cache = jax.lax.dynamic_update_slice(k_cache, k_BxLxGxK.swapaxes(1, 2).astype(k_cache.dtype), at)
            v_cache = jax.lax.dynamic_update_slice(v_cache, v_BxLxGxK.swapaxes(1, 2).astype(v_cache.dtype), at)
            ctx = cached_attention(q_BxLxHxK, k_cache.astype(dtype), v_cache.astype(dtype), kv.mask, kv.index,
                                   scale=cfg.attention_scale, window=window)
            new_kv = (k_cache, v_cache)
        a_BxLxD = dense(D, ("heads", "embed"), "attention_output")(ctx.reshape(B, L, H * K))
        if cfg.is_gemma:
            a_BxLxD = norm("post_attention_norm")(a_BxLxD)
        x_BxLxD = x_BxLxD + dropout(self, a_BxLxD, cfg.dropout_rate)

        h = norm("mlp_norm")(x_BxLxD)
        gate = dense(cfg.intermediate_size, ("embed", "mlp"), "wi_0", bias=False)(h)
        up = dense(cfg.intermediate_size, ("embed", "mlp"), "wi_1", bias=False)(h)
        h = dropout(self, activation(cfg.hidden_act)(gate) * up, cfg.dropout_rate)
        m_BxLxD = dense(D, ("mlp", "embed"), "wo", bias=False)(h)
        if cfg.is_gemma:
            m_BxLxD = norm("post_mlp_norm")(m_BxLxD)
        y_BxLxD = _constrain(x_BxLxD + dropout(self, m_BxLxD, cfg.dropout_rate))
        return scan_out(cfg, y_BxLxD) if kv is None else (y_BxLxD, new_kv)


class DecoderEncoder(nn.Module):
    """Token ids [B, L] -> final-norm hidden states [B, L, D]. The mask is 0 at padding, on either side."""

    cfg: DecoderConfig

    @nn.compact
    def __call__(self, input_ids_BxL: jax.Array, mask_BxL: jax.Array,
                 token_type_ids_BxL: jax.Array | None = None, exit_layers: tuple[int, ...] = (),
                 positions_BxL: jax.Array | None = None, kv: KVCache | None = None) -> Any:
        """`exit_layers` (2D Matryoshka): returns `(hidden, [final_norm(state after each of those layer counts)])`.
        `positions_BxL`: rotary positions per row (None: 0 .. L-1). `kv` (causal decoding): returns
        `(hidden, kv with every layer's cache updated)`; see `KVCache`."""
        del token_type_ids_BxL   # decoders have no token types
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        x_BxLxD = Embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), dtype=dtype,
                        name="token_embedder")(input_ids_BxL)
        if cfg.is_gemma:   # sqrt(hidden_size) in the compute dtype, as transformers casts it to the weights'
            x_BxLxD = x_BxLxD * jnp.asarray(math.sqrt(cfg.hidden_size), dtype)
        x_BxLxD = _constrain(dropout(self, x_BxLxD, cfg.dropout_rate))
        final_norm = RMSNorm(cfg.rms_norm_eps, dtype=dtype, zero_centered=cfg.is_gemma, name="final_norm")
        if kv is not None or positions_BxL is not None:
            if cfg.scan_layers or exit_layers:
                raise ValueError("positions / a key / value cache are for the unscanned full model (generation): "
                                 "set scan_layers=False and ask for no exit layers")
            caches = []
            for i, layer_type in enumerate(cfg.layer_types):
                layer = DecoderLayer(cfg, layer_type, name=f"layer_{i}")
                if kv is None:
                    x_BxLxD = layer(x_BxLxD, mask_BxL, positions_BxL)
                else:
                    x_BxLxD, layer_kv = layer(x_BxLxD, mask_BxL, positions_BxL, dataclasses.replace(kv, layer=i))
                    caches.append(layer_kv)
            h_BxLxD = final_norm(x_BxLxD)
            return h_BxLxD if kv is None else (h_BxLxD, dataclasses.replace(kv, layers=tuple(caches)))
        if cfg.scan_layers:   # every layer of one type (checked by the config); exits refused there
            x_BxLxD = run_layers(DecoderLayer, cfg, cfg.num_hidden_layers, x_BxLxD, mask_BxL, exits=exit_layers)
            return final_norm(x_BxLxD)
        exits = check_exits(exit_layers, cfg.num_hidden_layers)
        layer = layer_class(DecoderLayer, cfg.remat)
        states = []
        for i, layer_type in enumerate(cfg.layer_types):
            x_BxLxD = layer(cfg, layer_type, name=f"layer_{i}")(x_BxLxD, mask_BxL)
            if i + 1 in exits:
                states.append(final_norm(x_BxLxD))
        return (final_norm(x_BxLxD), states) if exits else final_norm(x_BxLxD)


class DecoderLM(nn.Module):
    """The decoder with its language-model head (generation and scoring, `embedjax.generate`): token ids ->
    next-token logits [B, L or `last`, V] in float32. Parameters: `decoder` (a `DecoderEncoder`'s) and, when the
    checkpoint does not tie the head to the embedding table (`tie_word_embeddings` false), `lm_head` (kernel
    [D, V]). Gemma 3's `final_logit_softcapping` c is applied as transformers' Gemma3ForCausalLM applies it:
    logits = c * tanh(logits / c)."""

    cfg: DecoderConfig

    def setup(self) -> None:
        self.decoder = DecoderEncoder(self.cfg)
        if not self.cfg.tie_word_embeddings:
            self.lm_head = Dense(self.cfg.vocab_size, ("embed", "vocab"), use_bias=False,
                                 dtype=jnp.dtype(self.cfg.dtype))

    def __call__(self, input_ids_BxL: jax.Array, mask_BxL: jax.Array, positions_BxL: jax.Array,
                 kv: KVCache | None = None, last: int | None = None) -> Any:
        """`positions_BxL`: each token's rotary position; `kv`: a cache to write this call's keys and values to
        (returns (logits, kv)); `last`: logits of the last `last` positions only (the [B, L, V] logits of a
        long prompt and a 262k vocabulary would not fit)."""
        out = self.decoder(input_ids_BxL, mask_BxL, positions_BxL=positions_BxL, kv=kv)
        h_BxLxD, kv = out if kv is not None else (out, None)
        if last is not None:
            h_BxLxD = h_BxLxD[:, -last:]
        logits_BxLxV = self.logits(h_BxLxD)
        return logits_BxLxV if kv is None else (logits_BxLxV, kv)

    def logits(self, h_BxLxD: jax.Array) -> jax.Array:
        cfg = self.cfg
        if cfg.tie_word_embeddings:
            table_VxD = nn.meta.unbox(self.decoder.variables["params"]["token_embedder"]["embedding"])
            logits = jnp.einsum("bld,vd->blv", h_BxLxD, table_VxD.astype(h_BxLxD.dtype),
                                preferred_element_type=jnp.float32)
        else:
            logits = self.lm_head(h_BxLxD).astype(jnp.float32)
        if cfg.final_logit_softcapping is not None:
            cap = float(cfg.final_logit_softcapping)
            logits = jnp.tanh(logits / cap) * cap
        return logits
