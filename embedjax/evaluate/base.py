"""The one evaluator interface: ``Evaluator.run(encode_fn) -> dict[str, float]``.

An *encode_fn* is any callable ``encode_fn(texts: list[str], role: str) -> np.ndarray`` returning a float32
``[N, D]`` array, where ``role`` is ``"query"`` or ``"document"`` (STS encodes both sides as ``"query"``).
Evaluators never see a model, only this function, so the CLI, the trainer's eval hooks and notebooks can
evaluate anything that embeds text: an :class:`embedjax.Encoder` (via :func:`encode_fn_from_encoder`),
a sentence-transformers model (:func:`encode_fn_from_sentence_transformer`, the peer used in checks), or a
fake for tests and benchmarks.

An encode_fn may carry a ``cache_key: str`` attribute, a fingerprint of everything that determines its
output (weights, config, prompt, max length). Evaluators that embed large fixed corpora (retrieval) use it to
cache those embeddings on disk; an encode_fn without it is never cached.

Metric values are plain fractions (Spearman in [-1, 1], nDCG in [0, 1]); the CLI prints them x100.
"""

from __future__ import annotations

import abc
import hashlib
import inspect
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import numpy as np

Role = Literal["query", "document"]
ROLES: tuple[str, ...] = ("query", "document")


class EncodeFn(Protocol):
    """``encode_fn(texts, role) -> float32 [N, D]``; optional attribute ``cache_key: str``."""

    def __call__(self, texts: list[str], role: str) -> np.ndarray: ...


class Evaluator(abc.ABC):
    """Evaluates an encode_fn on one task and returns named metrics (fractions, not x100)."""

    #: Short task name used in tables and metric JSON ("stsb-test", "beir:scifact-test").
    name: str = "evaluator"
    #: The metric a model-selection hook should look at.
    main_metric: str = ""

    @abc.abstractmethod
    def run(self, encode_fn: EncodeFn) -> dict[str, float]:
        """Embeds the task's texts with ``encode_fn`` and returns ``{metric_name: value}``."""


def get_cache_key(encode_fn: Any) -> str | None:
    """The encode_fn's ``cache_key`` attribute, or None when it has none (then nothing is cached)."""
    key = getattr(encode_fn, "cache_key", None)
    if key is None:
        return None
    if not isinstance(key, str) or not key:
        raise TypeError(f"encode_fn.cache_key must be a non-empty str, got {key!r}")
    return key


def check_embeddings(emb: Any, n_texts: int, role: str) -> np.ndarray:
    """Validates what an encode_fn returned: a finite ``[n_texts, D]`` array, returned as float32."""
    arr = np.asarray(emb)
    if arr.ndim != 2 or arr.shape[0] != n_texts:
        raise ValueError(
            f"encode_fn returned shape {arr.shape} for {n_texts} {role} texts; expected [{n_texts}, D]"
        )
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        bad = int(np.argwhere(~np.isfinite(arr))[0, 0])
        raise ValueError(f"encode_fn returned NaN/Inf for {role} text #{bad}")
    return arr


def encode_in_pieces(
    encode_fn: EncodeFn,
    texts: Sequence[str],
    role: str,
    piece_size: int = 1024,
    progress: Any = None,
) -> np.ndarray:
    """Calls ``encode_fn`` on ``piece_size`` texts at a time (for progress reporting) and stacks the results."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    out: list[np.ndarray] = []
    for start in range(0, len(texts), piece_size):
        piece = list(texts[start : start + piece_size])
        out.append(check_embeddings(encode_fn(piece, role), len(piece), role))
        if progress is not None:
            progress.update(len(piece))
    if not out:
        raise ValueError(f"no {role} texts to encode")
    return np.concatenate(out, axis=0) if len(out) > 1 else out[0]




def l2_normalize(x_NxD: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), float32."""
    norms = np.linalg.norm(x_NxD, axis=1, keepdims=True)
    return (x_NxD / np.maximum(norms, eps)).astype(np.float32, copy=False)


def _short_hash(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def encode_fn_from_encoder(
    encoder: Any,
    batch_size: int = 128,
    query_prompt: str | None = None,
    document_prompt: str | None = None,
    max_length: int | None = None,
    show_progress: bool = False,
) -> EncodeFn:
    """Wraps an object with the ``embedjax.Encoder`` API into an encode_fn.

    ``role`` selects the tower (``encoder.encode(..., tower=role)``) and the prompt passed to
    ``encoder.encode(prompt=...)``. Evaluators show their own progress bars, so the encoder's is off by
    default. ``cache_key`` is set from ``encoder.fingerprint`` plus the document prompt and max length (the
    things that change document embeddings); an encoder without a fingerprint gets no cache key.
    """
    prompts = {"query": query_prompt, "document": document_prompt}
    quiet_ok = "warn_truncation" in inspect.signature(encoder.encode).parameters
    warned = {"query": False, "document": False}

    def encode_fn(texts: list[str], role: str) -> np.ndarray:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        # evaluators encode in pieces: one truncation warning per role, not one per piece
        extra = {"warn_truncation": False} if quiet_ok and warned[role] else {}
        emb = encoder.encode(
            list(texts),
            batch_size=batch_size,
            max_length=max_length,
            prompt=prompts[role],
            tower=role,
            show_progress=show_progress,
            **extra,
        )
        warned[role] = warned[role] or bool(getattr(encoder, "last_num_truncated", 0))
        return np.asarray(emb, dtype=np.float32)

    fingerprint = getattr(encoder, "fingerprint", None)
    if fingerprint:
        encode_fn.cache_key = "embedjax:" + _short_hash(  # type: ignore[attr-defined]
            str(fingerprint), f"document_prompt={document_prompt!r}", f"max_length={max_length!r}"
        )
    encode_fn.encoder = encoder  # type: ignore[attr-defined]
    return encode_fn


def encode_fn_from_sentence_transformer(
    model: Any,
    batch_size: int = 32,
    query_prompt: str | None = None,
    document_prompt: str | None = None,
    cache_key: str | None = None,
) -> EncodeFn:
    """Wraps a ``sentence_transformers.SentenceTransformer`` (the reference peer) into an encode_fn.

    Prompts are prepended as text. sentence-transformers has no weight fingerprint, so pass ``cache_key``
    yourself to enable the corpus cache.
    """
    prompts = {"query": query_prompt, "document": document_prompt}

    def encode_fn(texts: list[str], role: str) -> np.ndarray:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        emb = model.encode(
            list(texts),
            batch_size=batch_size,
            prompt=prompts[role],
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(emb, dtype=np.float32)

    if cache_key:
        encode_fn.cache_key = "st:" + _short_hash(  # type: ignore[attr-defined]
            cache_key, f"document_prompt={document_prompt!r}"
        )
    return encode_fn
