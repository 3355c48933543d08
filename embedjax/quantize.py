"""Compact embeddings: int8 / uint8 scalar quantisation with per-dimension calibration ranges, binary / ubinary
(one bit per dimension, packed), and the scores retrieval computes over them.

The codes are those of sentence-transformers' `quantize_embeddings` (bit for bit: the same ranges, rounding and
packing), so indexes built by either tool read alike:

  int8 / uint8   per dimension d, ranges[0, d] (min) .. ranges[1, d] (max) split into 255 steps; code =
                 floor((x - min) / step) clipped to 0..255 (uint8), minus 128 for int8. Ranges come from a
                 calibration sample (`calibration_ranges`), never from the data being quantised one batch at a time.
  ubinary        x > 0 -> bit 1, packed 8 per byte (`np.packbits`, big-endian bit order); D/8 bytes.
  binary         the same bytes minus 128, as int8.

Scores (`score`): float32 and the scalar codes are scored with the float query against the (dequantised)
documents, an asymmetric dot product: the index holds 1 byte per dimension and the query loses nothing;
binary codes by Hamming distance between the query's bits and the document's (score = -distance), computed as
one matrix product of unpacked bits. `rescore` re-ranks a binary search's candidates with the float query
against int8 or float32 documents.
"""
from __future__ import annotations

from typing import Literal

import numpy as np

Precision = Literal["float32", "int8", "uint8", "binary", "ubinary"]
PRECISIONS: tuple[str, ...] = ("float32", "int8", "uint8", "binary", "ubinary")
SCALAR = ("int8", "uint8")
BINARY = ("binary", "ubinary")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def calibration_ranges(emb_NxD: np.ndarray) -> np.ndarray:
    """[2, D] float32: each dimension's minimum and maximum over a calibration sample (at least 2 rows)."""
    emb_NxD = np.asarray(emb_NxD, np.float32)
    if emb_NxD.ndim != 2 or emb_NxD.shape[0] < 2:
        raise ValueError(f"calibration needs a [N >= 2, D] sample of embeddings, got shape {emb_NxD.shape}")
    return np.stack([emb_NxD.min(axis=0), emb_NxD.max(axis=0)]).astype(np.float32)


def _steps(ranges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ranges = np.asarray(ranges, np.float32)
    if ranges.ndim != 2 or ranges.shape[0] != 2:
        raise ValueError(f"ranges must be [2, D] (min, max per dimension), got shape {ranges.shape}")
    starts = ranges[0]
    steps = (ranges[1] - starts) / 255
    return starts, np.where(steps == 0, 1, steps).astype(np.float32)


def quantize(emb_NxD: np.ndarray, precision: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """Codes of `emb_NxD` at `precision` (see module docstring). int8 / uint8 need `ranges`."""
    check_precision(precision)
    emb = np.asarray(emb_NxD, np.float32)
    if precision == "float32":
        return emb
    if precision in SCALAR:
        if ranges is None:
            raise ValueError(f"{precision} quantisation needs calibration ranges (see calibration_ranges)")
        starts, steps = _steps(ranges)
        if starts.shape[0] != emb.shape[-1]:
            raise ValueError(f"ranges are for dimension {starts.shape[0]}, embeddings have {emb.shape[-1]}")
        q = np.clip(np.floor((emb - starts) / steps), 0, 255)
        return q.astype(np.uint8) if precision == "uint8" else (q - 128).astype(np.int8)
    packed = np.packbits(emb > 0, axis=-1)
    return packed if precision == "ubinary" else (packed.astype(np.int16) - 128).astype(np.int8)


def dequantize(codes: np.ndarray, precision: str, ranges: np.ndarray | None = None,
               dim: int | None = None) -> np.ndarray:
    """float32 values that `codes` stand for: scalar codes back on the calibration grid; binary codes as
    0 / 1 per dimension (`dim` trims the padding bits of a dimension that is not a multiple of 8)."""
    check_precision(precision)
    if precision == "float32":
        return np.asarray(codes, np.float32)
    if precision in SCALAR:
        starts, steps = _steps(ranges)
        c = codes.astype(np.float32) + (128.0 if precision == "int8" else 0.0)
        return c * steps + starts
    bits = np.unpackbits(_ubinary(codes, precision), axis=-1)
    return bits[..., :dim].astype(np.float32) if dim is not None else bits.astype(np.float32)


def _ubinary(codes: np.ndarray, precision: str) -> np.ndarray:
    return codes if precision == "ubinary" else (codes.astype(np.int16) + 128).astype(np.uint8)


def bytes_per_vector(dim: int, precision: str) -> int:
    check_precision(precision)
    return {"float32": 4 * dim, "int8": dim, "uint8": dim}.get(precision, (dim + 7) // 8)


def score(q_QxD: np.ndarray, codes_CxB: np.ndarray, precision: str, ranges: np.ndarray | None = None,
          dim: int | None = None) -> np.ndarray:
    """[Q, C] float32 scores of float queries against documents stored as `codes` (higher is better).

    float32 / int8 / uint8: the dot product of the float query with the (dequantised) documents, computed as
    ``q . start + (q * step) . code`` without materialising float documents. binary / ubinary: minus the Hamming
    distance between the query's sign bits and the document's, computed exactly as
    ``|q| + |d| - 2 q.d`` over 0/1 vectors (one matrix product)."""
    check_precision(precision)
    q = np.asarray(q_QxD, np.float32)
    if precision == "float32":
        return q @ np.asarray(codes_CxB, np.float32).T
    if precision in SCALAR:
        starts, steps = _steps(ranges)
        c = codes_CxB.astype(np.float32) + (128.0 if precision == "int8" else 0.0)
        return (q @ starts)[:, None] + (q * steps) @ c.T
    D = q.shape[1] if dim is None else dim
    qb = (q > 0).astype(np.float32)
    db = np.unpackbits(_ubinary(codes_CxB, precision), axis=-1)[:, :D].astype(np.float32)
    hamming = qb.sum(1)[:, None] + db.sum(1)[None, :] - 2.0 * (qb @ db.T)
    return -hamming




# ----------------------------------------------------------------------------------------------- whitening

def fit_whitening(emb_NxD: np.ndarray, dim: int | None = None, eps: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """Whitening of sentence embeddings (Su et al. 2021, "Whitening Sentence Representations"): the mean `mu`
    [D] and a matrix `W` [D, k] with ``(x - mu) @ W`` of identity covariance over the sample, its columns the
    principal directions in order of variance, so that keeping `dim` = k < D columns is a PCA cut. Fitted in
    float64 from at least 2 rows."""
    x = np.asarray(emb_NxD, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"whitening needs a [N >= 2, D] sample of embeddings, got shape {x.shape}")
    k = x.shape[1] if dim is None else int(dim)
    if not 1 <= k <= x.shape[1]:
        raise ValueError(f"whitening dim must be in [1, {x.shape[1]}], got {dim}")
    mu = x.mean(axis=0)
    cov = np.cov(x - mu, rowvar=False)
    u, s, _ = np.linalg.svd(cov)
    w = u[:, :k] / np.sqrt(s[:k] + eps)[None, :]
    return mu.astype(np.float32), w.astype(np.float32)


def apply_whitening(emb_NxD: np.ndarray, mu: np.ndarray, w: np.ndarray, normalize: bool) -> np.ndarray:
    """``(x - mu) @ W``, L2-normalised when the model's output is."""
    out = (np.asarray(emb_NxD, np.float32) - mu) @ w
    if normalize:
        out = out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return np.ascontiguousarray(out, dtype=np.float32)


__all__ = ["PRECISIONS", "Precision", "apply_whitening", "bytes_per_vector", "calibration_ranges", "check_precision",
           "dequantize", "fit_whitening", "quantize", "score"]
