"""Losses for dual encoders: pure functions over GLOBAL arrays, plus `jax.shard_map` forms.

Every loss takes embeddings (or scores) of the whole global batch and returns
``(loss_scalar, metrics)`` with ``metrics: dict[str, jax.Array]``; ``metrics["accuracy"]`` is the in-batch
top-1 accuracy where that is meaningful (see each docstring for what it means otherwise).

Under ``jax.jit`` with batch-sharded inputs (``NamedSharding`` over the data axes) GSPMD inserts the
collectives, so the dense functions already see every document of the global batch as a negative. The
``*_sharded`` forms spell the collectives out with ``jax.shard_map``:

* :func:`in_batch_softmax_sharded` all-gathers documents (and hard negatives) and each device computes
  only its own rows of the logits (``b x N``, never ``B x N``). GSPMD partitions the dense form the same
  way today (same compiled temp memory on CPU); this form makes that layout and its one all-gather explicit
  instead of leaving them to the partitioner;
* :func:`sigmoid_loss_sharded` never gathers: document shards travel around a ring of devices
  (``jax.lax.ppermute``), and a custom VJP rotates them again on the way back, so each device holds one
  ``b x b`` logits block and ``O(b x D)`` residuals at a time (B=4096, D=128, 8 devices: 2.25 MiB of
  compiled temp memory per device for value and gradients, against 18 MiB for the dense form).

Both equal their dense forms, value and gradients (``tests/test_losses.py`` checks it on 8 fake devices).

Conventions: ``B`` global batch, ``b`` per-device batch, ``D`` embedding dim, ``K`` hard negatives per
query, ``N`` candidates per query. Similarities are plain dot products: pass unit-norm embeddings for
cosine similarity (the model's head normalises by default). In :func:`in_batch_softmax` logits are
``sim / temperature``; in :func:`sigmoid_loss` they are ``t * sim + b`` (SigLIP's parametrisation).
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from embedjax import sharding

Metrics = dict[str, jax.Array]
LossFn = Callable[..., tuple[jax.Array, Metrics]]



# ----------------------------------------------------------------------------------------------- helpers


def _err(fn: str, msg: str) -> ValueError:
    return ValueError(f"embedjax.losses.{fn}: {msg}")


def _float(x: Any) -> jax.Array:
    """As a floating array of at least float32 precision (bf16 embeddings are promoted for the loss)."""
    x = jnp.asarray(x)
    return x.astype(jnp.result_type(x.dtype, jnp.float32))


def _check_matrix(fn: str, name: str, x: Any) -> None:
    if getattr(x, "ndim", None) != 2:
        raise _err(fn, f"{name} must be a 2-D array, got shape {getattr(x, 'shape', type(x).__name__)}")


def _check_same_shape(fn: str, names: Sequence[str], arrays: Sequence[Any]) -> None:
    for name, x in zip(names, arrays):
        _check_matrix(fn, name, x)
    shapes = [tuple(x.shape) for x in arrays]
    if len(set(shapes)) != 1:
        got = ", ".join(f"{n}={s}" for n, s in zip(names, shapes))
        raise _err(fn, f"{', '.join(names)} must have the same shape; got {got}")


def _check_positive(fn: str, name: str, value: Any) -> None:
    """Checks a concrete (Python / NumPy) scalar; traced values (learned parameters) pass through."""
    try:
        v = float(value)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):  # traced (learned) or not a scalar
        return
    if not v > 0:
        raise _err(fn, f"{name} must be > 0, got {v}")


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """``x / max(||x||, eps)`` along ``axis``."""
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def _as_axes(axis_names: str | Sequence[str] | None) -> tuple[str, ...]:
    if axis_names is None:   # the batch axes of embedjax.sharding, the one module that names mesh axes
        return tuple(sharding.BATCH_AXES)
    return (axis_names,) if isinstance(axis_names, str) else tuple(axis_names)


def _ring_size(fn: str, mesh: Mesh, axis_names: tuple[str, ...], batch: int) -> int:
    """Number of batch shards (product of the data axes' sizes); checks the axes and divisibility."""
    if not isinstance(mesh, (Mesh, jax.sharding.AbstractMesh)):
        raise _err(fn, f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    missing = [a for a in axis_names if a not in mesh.shape]
    if missing:
        raise _err(fn, f"axis_names {missing} are not axes of the mesh {dict(mesh.shape)}")
    n = 1
    for a in axis_names:
        n *= mesh.shape[a]
    if batch % n:
        raise _err(fn, f"global batch {batch} is not divisible by the {n} shards of mesh axes {axis_names}")
    return n


def candidate_scores(q_BxD: jax.Array, d_BxD: jax.Array, *, hard_negatives_BxKxD: jax.Array | None = None,
                     same_tower: bool = False) -> tuple[jax.Array, jax.Array]:
    """The in-batch candidate similarities that :func:`in_batch_softmax` ranks, for distillation.

    Returns ``(scores_BxN, valid_BxN)``; the candidates of query ``i`` are, in this order: the ``B``
    documents (the positive is column ``i``), the ``B*K`` hard negatives of the whole batch (query ``j``'s
    ``k``-th at column ``B + j*K + k``), and with ``same_tower`` the ``B`` queries (its own one invalid).
    Compute the teacher's scores in the same layout and pass both to :func:`distill_kl` with the mask.
    """
    _check_same_shape("candidate_scores", ("q_BxD", "d_BxD"), (q_BxD, d_BxD))
    q, d = _float(q_BxD), _float(d_BxD)
    B, D = q.shape
    blocks, valid = [q @ d.T], [jnp.ones((B, B), bool)]
    if hard_negatives_BxKxD is not None:
        _check_hard_negatives("candidate_scores", hard_negatives_BxKxD, B, D)
        hn_NxD = _float(hard_negatives_BxKxD).reshape(-1, D)
        blocks.append(q @ hn_NxD.T)
        valid.append(jnp.ones((B, hn_NxD.shape[0]), bool))
    if same_tower:
        blocks.append(q @ q.T)
        valid.append(~jnp.eye(B, dtype=bool))
    return jnp.concatenate(blocks, axis=1), jnp.concatenate(valid, axis=1)


def _check_hard_negatives(fn: str, hn: Any, B: int, D: int) -> None:
    shape = tuple(getattr(hn, "shape", ()))
    if len(shape) != 3 or shape[0] != B or shape[2] != D:
        raise _err(fn, f"hard_negatives_BxKxD must have shape [B, K, D] = [{B}, K, {D}], got {shape}")


# ------------------------------------------------------------------------------- in-batch softmax (InfoNCE)


def _softmax_rows(rows_b: jax.Array, blocks: list[jax.Array], is_pos_bxB: jax.Array, *, temperature: Any,
                  margin: float, invalid_bxN: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy of each row over the candidate blocks (the first block holds the positive).

    Returns (per-row loss, per-row top-1 correct). The additive margin is subtracted from the positive
    similarity before scaling (AM-softmax); top-1 is judged on the raw similarities. Entries of
    ``invalid_bxN`` are excluded after the division by the temperature (so its gradient stays finite).
    """
    sims_bxB = blocks[0]
    pos_b = jnp.sum(jnp.where(is_pos_bxB, sims_bxB, 0.0), axis=1)
    first = sims_bxB - margin * is_pos_bxB if margin else sims_bxB
    logits_bxN = jnp.concatenate([first, *blocks[1:]], axis=1) / temperature
    sims_bxN = jnp.concatenate(blocks, axis=1)
    if invalid_bxN is not None:
        logits_bxN = jnp.where(invalid_bxN, -jnp.inf, logits_bxN)
        sims_bxN = jnp.where(invalid_bxN, -jnp.inf, sims_bxN)
    loss_b = jax.nn.logsumexp(logits_bxN, axis=1) - (pos_b - margin) / temperature
    correct_b = jnp.argmax(sims_bxN, axis=1) == rows_b
    return loss_b, correct_b


def _same_text(a_xx2: jax.Array, b_yx2: jax.Array) -> jax.Array:
    """[x, y] bool: text key a[i] equals text key b[j] (keys are 64-bit hashes as two int32 words)."""
    return jnp.all(a_xx2[:, None, :] == b_yx2[None, :, :], axis=-1)


def _false_negatives(keys: Sequence[jax.Array], is_pos_bxB: jax.Array, *, with_hn: bool,
                     same_tower: bool) -> dict[str, jax.Array]:
    """The in-batch candidates of each row that are really positives (see :func:`in_batch_softmax`).

    ``keys``: (query keys of the rows [b, 2], document keys of the rows [b, 2], query keys of the batch [B, 2],
    document keys of the batch [B, 2], hard-negative keys of the batch [N, 2] or None)."""
    qk_b, dk_b, qk_B, dk_B, hk_N = keys
    dup_query_bxB = _same_text(qk_b, qk_B)
    # documents: another row's positive that is this row's positive text, or the positive of a duplicate query
    out = {"documents": (_same_text(dk_b, dk_B) | dup_query_bxB) & ~is_pos_bxB}
    if with_hn:   # a hard negative (of any row) whose text is this row's positive
        out["negatives"] = _same_text(dk_b, hk_N)
    if same_tower:   # another query whose text is this query's, or this row's positive
        out["queries"] = (dup_query_bxB | _same_text(dk_b, qk_B)) & ~is_pos_bxB
    # documents -> queries: another query whose text is this query's, or whose positive is this document
    out["d2q"] = out["documents"]
    return out


def _in_batch_sums(q_bxD: jax.Array, d_bxD: jax.Array, q_BxD: jax.Array | None, d_BxD: jax.Array,
                   hn_NxD: jax.Array | None, *, row_offset: Any, temperature: Any, bidirectional: bool,
                   same_tower: bool, margin: float, hn_valid_N: jax.Array | None = None,
                   fn_keys: Sequence[jax.Array] | None = None) -> dict[str, jax.Array]:
    """Sums over the rows ``row_offset .. row_offset + b`` of the global batch (all of it when dense)."""
    b, B = q_bxD.shape[0], d_BxD.shape[0]
    rows_b = row_offset + jnp.arange(b)
    is_pos_bxB = jnp.arange(B)[None, :] == rows_b[:, None]
    fneg = (None if fn_keys is None else
            _false_negatives(fn_keys, is_pos_bxB, with_hn=hn_NxD is not None, same_tower=same_tower))
    sims_bxB = q_bxD @ d_BxD.T
    blocks, invalid = [sims_bxB], [jnp.zeros((b, B), bool) if fneg is None else fneg["documents"]]
    if hn_NxD is not None:
        hn_invalid = (jnp.zeros((b, hn_NxD.shape[0]), bool) if hn_valid_N is None
                      else jnp.broadcast_to(~hn_valid_N[None, :], (b, hn_NxD.shape[0])))
        blocks.append(q_bxD @ hn_NxD.T)
        invalid.append(hn_invalid if fneg is None else hn_invalid | fneg["negatives"])
    if same_tower:  # other queries as negatives (Gecko); a query is not its own negative
        blocks.append(q_bxD @ q_BxD.T)
        invalid.append(is_pos_bxB if fneg is None else is_pos_bxB | fneg["queries"])
    masked = same_tower or (hn_NxD is not None and hn_valid_N is not None) or fneg is not None
    invalid_bxN = jnp.concatenate(invalid, axis=1) if masked else None
    loss_b, correct_b = _softmax_rows(rows_b, blocks, is_pos_bxB, temperature=temperature, margin=margin,
                                      invalid_bxN=invalid_bxN)
    pos_sum = jnp.sum(jnp.where(is_pos_bxB, sims_bxB, 0.0))
    sums = {"loss_q2d": jnp.sum(loss_b), "accuracy": jnp.sum(correct_b.astype(jnp.float32)),
            "pos_sim": pos_sum, "neg_sim": jnp.sum(sims_bxB) - pos_sum}
    if fneg is not None:   # candidates masked out of the query -> document loss only as false negatives
        n = jnp.sum(fneg["documents"]) + jnp.sum(fneg.get("queries", False))
        if hn_NxD is not None:
            n = n + jnp.sum(fneg["negatives"] & ~hn_invalid)
        sums["false_negatives"] = n.astype(jnp.float32)
    if bidirectional:  # documents retrieving their query among all queries
        loss_b, correct_b = _softmax_rows(rows_b, [d_bxD @ q_BxD.T], is_pos_bxB, temperature=temperature,
                                          margin=margin, invalid_bxN=None if fneg is None else fneg["d2q"])
        sums["loss_d2q"] = jnp.sum(loss_b)
        sums["accuracy_d2q"] = jnp.sum(correct_b.astype(jnp.float32))
    return sums


def _in_batch_finish(sums: Mapping[str, jax.Array], B: int,
                     temperature: jax.Array) -> tuple[jax.Array, Metrics]:
    m = {k: v / B for k, v in sums.items()}
    m["neg_sim"] = sums["neg_sim"] / max(B * (B - 1), 1)
    m["temperature"] = temperature
    loss = 0.5 * (m["loss_q2d"] + m["loss_d2q"]) if "loss_d2q" in m else m["loss_q2d"]
    return loss, m


def _in_batch_validate(fn: str, q_BxD: Any, d_BxD: Any, temperature: Any, hard_negatives_BxKxD: Any,
                       margin: float) -> None:
    _check_same_shape(fn, ("q_BxD", "d_BxD"), (q_BxD, d_BxD))
    _check_positive(fn, "temperature", temperature)
    if hard_negatives_BxKxD is not None:
        _check_hard_negatives(fn, hard_negatives_BxKxD, *q_BxD.shape)
    if not margin >= 0:
        raise _err(fn, f"margin must be >= 0, got {margin}")


def in_batch_softmax(q_BxD: jax.Array, d_BxD: jax.Array, *, temperature: Any,
                     hard_negatives_BxKxD: jax.Array | None = None, bidirectional: bool = True,
                     same_tower: bool = False, margin: float = 0.0,
                     hard_negatives_valid_BxK: jax.Array | None = None,
                     false_negative_keys: Sequence[Any] | None = None) -> tuple[jax.Array, Metrics]:
    """In-batch softmax (InfoNCE) over the global batch: query ``i`` must pick document ``i``.

    Candidates for query ``i``: all ``B`` documents, plus all ``B*K`` hard negatives of the batch (as GTR
    and Gecko do), plus with ``same_tower`` the other ``B-1`` queries (Gecko). With ``bidirectional`` the
    document->query loss over the ``B`` queries is averaged in (Sentence-T5). Logits are
    ``(sim - margin * [positive]) / temperature``; ``temperature`` may be traced (``exp(log_t)`` learned).

    Metrics: ``accuracy`` (query->doc top-1 among all candidates), ``accuracy_d2q``, ``loss_q2d``,
    ``loss_d2q``, ``pos_sim`` / ``neg_sim`` (mean positive / in-batch negative similarity), ``temperature``.
    ``hard_negatives_valid_BxK`` (bool) drops hard-negative slots that hold no real negative (padding rows of
    examples with fewer than K negatives) from every query's candidates.

    **False-negative masks** (Gecko, Gemini Embedding): ``false_negative_keys = (query_keys_Bx2,
    document_keys_Bx2, hard_negative_keys_BxKx2 or None)``, a hash of each text (int32 pairs; equal keys =
    equal texts, see ``embedjax.data.pipeline.text_key_words``). Out of row ``i``'s candidates go: another
    row's positive whose text is row ``i``'s positive, the positive of another row with the same query text,
    a hard negative whose text is row ``i``'s positive, and (``same_tower``) another query whose text is row
    ``i``'s query or positive; in the document->query direction, the queries of those rows. Metric
    ``false_negatives``: candidates so masked per query.
    """
    fn = "in_batch_softmax"
    _in_batch_validate(fn, q_BxD, d_BxD, temperature, hard_negatives_BxKxD, margin)
    fn_keys = _fn_keys(fn, false_negative_keys, q_BxD.shape[0], hard_negatives_BxKxD)
    q, d = _float(q_BxD), _float(d_BxD)
    temperature = _float(temperature)
    hn_NxD = None if hard_negatives_BxKxD is None else _float(hard_negatives_BxKxD).reshape(-1, q.shape[1])
    hn_valid_N = None
    if hard_negatives_valid_BxK is not None and hn_NxD is not None:
        hn_valid_N = jnp.asarray(hard_negatives_valid_BxK).astype(bool).reshape(-1)
    if fn_keys is not None:
        qk, dk, hk = fn_keys
        fn_keys = (qk, dk, qk, dk, None if hk is None else hk.reshape(-1, 2))
    sums = _in_batch_sums(q, d, q, d, hn_NxD, row_offset=0, temperature=temperature,
                          bidirectional=bidirectional, same_tower=same_tower, margin=float(margin),
                          hn_valid_N=hn_valid_N, fn_keys=fn_keys)
    return _in_batch_finish(sums, q.shape[0], temperature)


def _fn_keys(fn: str, keys: Sequence[Any] | None, B: int, hn: Any) -> tuple | None:
    """Checks ``false_negative_keys`` (see :func:`in_batch_softmax`); returns them as int32 arrays."""
    if keys is None:
        return None
    if len(keys) != 3:
        raise _err(fn, "false_negative_keys must be (query_keys_Bx2, document_keys_Bx2, hard_negative_keys_BxKx2 "
                       f"or None), got {len(keys)} item(s)")
    qk, dk, hk = (None if k is None else jnp.asarray(k, jnp.int32) for k in keys)
    for name, k in (("query_keys_Bx2", qk), ("document_keys_Bx2", dk)):
        if k is None or k.shape != (B, 2):
            raise _err(fn, f"false_negative_keys: {name} must have shape [{B}, 2], got "
                           f"{None if k is None else k.shape}")
    if (hk is None) != (hn is None):
        raise _err(fn, "false_negative_keys: hard_negative_keys_BxKx2 must be given exactly when there are hard "
                       "negatives")
    if hk is not None and hk.shape != (*hn.shape[:2], 2):
        raise _err(fn, f"false_negative_keys: hard_negative_keys_BxKx2 must have shape {(*hn.shape[:2], 2)}, got "
                       f"{hk.shape}")
    return qk, dk, hk


def _shard_map_in_batch(body: Callable, mesh: Mesh, axes: tuple[str, ...], q_BxD: Any, d_BxD: Any, temperature: Any,
                        hn_BxKxD: Any, hn_valid_BxK: Any, extra: Sequence[Any] = ()) -> tuple[jax.Array, Metrics]:
    """`body(q_bxD, d_bxD, temperature, [hard negatives, [their validity]])` as a shard_map over the batch axes:
    the in-batch softmax forms' one calling convention."""
    args = [_float(q_BxD), _float(d_BxD), _float(temperature)]
    specs = [P(axes, None), P(axes, None), P()]
    if hn_BxKxD is not None:
        args.append(_float(hn_BxKxD))
        specs.append(P(axes, None, None))
        if hn_valid_BxK is not None:
            args.append(jnp.asarray(hn_valid_BxK).astype(bool))
            specs.append(P(axes, None))
    for x in extra:   # further batch-sharded arrays (false-negative keys)
        args.append(x)
        specs.append(P(axes, *([None] * (x.ndim - 1))))
    return jax.shard_map(body, mesh=mesh, in_specs=tuple(specs), out_specs=P())(*args)


def in_batch_softmax_sharded(q_BxD: jax.Array, d_BxD: jax.Array, *, temperature: Any, mesh: Mesh,
                             axis_names: str | Sequence[str] | None = None,
                             hard_negatives_BxKxD: jax.Array | None = None, bidirectional: bool = True,
                             same_tower: bool = False, margin: float = 0.0,
                             hard_negatives_valid_BxK: jax.Array | None = None,
                             false_negative_keys: Sequence[Any] | None = None) -> tuple[jax.Array, Metrics]:
    """:func:`in_batch_softmax` as a ``shard_map``: documents (and hard negatives with their validity, and
    queries when needed) are all-gathered over ``axis_names`` (default: the mesh axes the batch is sharded
    over, ``embedjax.sharding.BATCH_AXES``) and each device computes only its own ``b`` rows of the logits; the
    per-row losses are ``psum``-ed; false-negative keys are gathered alike. Same value and gradients as the
    dense form.
    """
    fn = "in_batch_softmax_sharded"
    _in_batch_validate(fn, q_BxD, d_BxD, temperature, hard_negatives_BxKxD, margin)
    fn_keys = _fn_keys(fn, false_negative_keys, q_BxD.shape[0], hard_negatives_BxKxD)
    axes = _as_axes(axis_names)
    B, D = q_BxD.shape
    _ring_size(fn, mesh, axes, B)
    margin = float(margin)
    with_hn = hard_negatives_BxKxD is not None
    with_valid = with_hn and hard_negatives_valid_BxK is not None
    key_args = () if fn_keys is None else tuple(k for k in fn_keys if k is not None)

    def body(q_bxD, d_bxD, temp, *rest):
        hn, keys = rest[: len(rest) - len(key_args)], rest[len(rest) - len(key_args):]
        b = q_bxD.shape[0]
        d_all = jax.lax.all_gather(d_bxD, axes, tiled=True)
        q_all = jax.lax.all_gather(q_bxD, axes, tiled=True) if (bidirectional or same_tower) else None
        hn_all = jax.lax.all_gather(hn[0].reshape(-1, D), axes, tiled=True) if with_hn else None
        valid_all = jax.lax.all_gather(hn[1].reshape(-1), axes, tiled=True) if with_valid else None
        keys_all = None
        if keys:
            gather = functools.partial(jax.lax.all_gather, axis_name=axes, tiled=True)
            keys_all = (keys[0], keys[1], gather(keys[0]), gather(keys[1]),
                        gather(keys[2].reshape(-1, 2)) if len(keys) == 3 else None)
        sums = _in_batch_sums(q_bxD, d_bxD, q_all, d_all, hn_all, row_offset=jax.lax.axis_index(axes) * b,
                              temperature=temp, bidirectional=bidirectional, same_tower=same_tower,
                              margin=margin, hn_valid_N=valid_all, fn_keys=keys_all)
        return _in_batch_finish(jax.lax.psum(sums, axes), B, temp)

    return _shard_map_in_batch(body, mesh, axes, q_BxD, d_BxD, temperature, hard_negatives_BxKxD,
                               hard_negatives_valid_BxK if with_valid else None, key_args)


# ------------------------------------------------------------------------------------ SigLIP sigmoid loss


def sigmoid_loss(q_BxD: jax.Array, d_BxD: jax.Array, *, t: Any, b: Any) -> tuple[jax.Array, Metrics]:
    """SigLIP pairwise sigmoid loss (arXiv 2303.15343): every (query, document) pair of the global batch is
    a binary problem, positive on the diagonal; logits ``t * sim + b`` (``t = exp(log_t)`` and ``b``
    learned). Normalised per example as in the paper: ``-1/B * sum_ij log sigmoid(label_ij * logit_ij)``.

    Metrics: ``accuracy`` (query->doc in-batch top-1), ``pos_logit`` / ``neg_logit`` (means), ``t``, ``b``.
    """
    fn = "sigmoid_loss"
    _check_same_shape(fn, ("q_BxD", "d_BxD"), (q_BxD, d_BxD))
    _check_positive(fn, "t", t)
    q, d, t, b = _float(q_BxD), _float(d_BxD), _float(t), _float(b)
    B = q.shape[0]
    logits_BxB = t * (q @ d.T) + b
    is_pos_BxB = jnp.eye(B, dtype=bool)
    loss = -jnp.sum(jax.nn.log_sigmoid(jnp.where(is_pos_BxB, logits_BxB, -logits_BxB))) / B
    pos_sum = jnp.sum(jnp.where(is_pos_BxB, logits_BxB, 0.0))
    accuracy = jnp.mean((jnp.argmax(logits_BxB, axis=1) == jnp.arange(B)).astype(jnp.float32))
    return loss, {"accuracy": accuracy, "pos_logit": pos_sum / B,
                  "neg_logit": (jnp.sum(logits_BxB) - pos_sum) / max(B * (B - 1), 1), "t": t, "b": b}


def _ring_perm(n: int) -> list[tuple[int, int]]:
    return [(i, (i + 1) % n) for i in range(n)]


def _ring_sigmoid_forward(axes: tuple[str, ...], n: int, q_bxD, d_bxD, t, bias):
    """Local sums over this device's rows; document shards rotate ``n - 1`` times around the ring."""
    b = q_bxD.shape[0]
    logits_bxb = t * (q_bxD @ d_bxD.T) + bias  # own shard: holds the positives
    is_pos = jnp.eye(b, dtype=bool)
    loss = -jnp.sum(jax.nn.log_sigmoid(jnp.where(is_pos, logits_bxb, -logits_bxb)))
    pos_b = jnp.sum(jnp.where(is_pos, logits_bxb, 0.0), axis=1)
    neg = jnp.sum(logits_bxb) - jnp.sum(pos_b)
    max_neg_b = jnp.max(jnp.where(is_pos, -jnp.inf, logits_bxb), axis=1)

    def step(carry, _):
        d_chunk, loss, neg, max_neg_b = carry
        d_chunk = jax.lax.ppermute(d_chunk, axes, _ring_perm(n))
        logits = t * (q_bxD @ d_chunk.T) + bias  # another device's documents: all negatives
        return (d_chunk, loss - jnp.sum(jax.nn.log_sigmoid(-logits)), neg + jnp.sum(logits),
                jnp.maximum(max_neg_b, jnp.max(logits, axis=1))), None

    (_, loss, neg, max_neg_b), _ = jax.lax.scan(step, (d_bxD, loss, neg, max_neg_b), None, length=n - 1)
    return loss, pos_b, neg, max_neg_b


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ring_sigmoid(axes, n, q_bxD, d_bxD, t, bias):
    return _ring_sigmoid_forward(axes, n, q_bxD, d_bxD, t, bias)


def _ring_sigmoid_fwd(axes, n, q_bxD, d_bxD, t, bias):
    # Residuals are the inputs only: the backward pass re-rotates instead of storing every chunk.
    return _ring_sigmoid_forward(axes, n, q_bxD, d_bxD, t, bias), (q_bxD, d_bxD, t, bias)


def _ring_sigmoid_bwd(axes, n, res, cts):
    """Gradient of the local loss sum (the metric outputs get no gradient; they are stop_gradient-ed).

    Each document chunk travels with the accumulator of its gradient; after ``n - 1`` rotations one more
    brings every accumulator home.
    """
    q_bxD, d_bxD, t, bias = res
    g = cts[0]
    b = q_bxD.shape[0]
    labels_bxb = jnp.where(jnp.eye(b, dtype=bool), 1.0, -1.0).astype(q_bxD.dtype)

    def block_grads(d_chunk, labels):
        sims = q_bxD @ d_chunk.T
        logits = t * sims + bias
        # d/dx -log sigmoid(y x) = -y sigmoid(-y x); for all-negative blocks (y = -1): sigmoid(x).
        if labels is None:
            dlogits = g * jax.nn.sigmoid(logits)
        else:
            dlogits = -g * labels * jax.nn.sigmoid(-labels * logits)
        return t * (dlogits @ d_chunk), t * (dlogits.T @ q_bxD), jnp.sum(dlogits * sims), jnp.sum(dlogits)

    dq, dd_acc, dt, db = block_grads(d_bxD, labels_bxb)

    def step(carry, _):
        d_chunk, dd_acc, dq, dt, db = carry
        d_chunk, dd_acc = jax.lax.ppermute((d_chunk, dd_acc), axes, _ring_perm(n))
        gq, gd, gt, gb = block_grads(d_chunk, None)
        return (d_chunk, dd_acc + gd, dq + gq, dt + gt, db + gb), None

    (_, dd_acc, dq, dt, db), _ = jax.lax.scan(step, (d_bxD, dd_acc, dq, dt, db), None, length=n - 1)
    dd = jax.lax.ppermute(dd_acc, axes, _ring_perm(n)) if n > 1 else dd_acc
    return dq, dd, dt, db


_ring_sigmoid.defvjp(_ring_sigmoid_fwd, _ring_sigmoid_bwd)


def sigmoid_loss_sharded(q_BxD: jax.Array, d_BxD: jax.Array, *, t: Any, b: Any, mesh: Mesh,
                         axis_names: str | Sequence[str] | None = None) -> tuple[jax.Array, Metrics]:
    """:func:`sigmoid_loss` as a ``shard_map`` ring (SigLIP section 3.1): queries stay put, document shards
    rotate around the devices of ``axis_names`` with ``ppermute``, and a custom VJP rotates them again
    for the gradients. No device ever holds more than one ``b x b`` logits block or the full global
    logits / documents. Same value and gradients as the dense form.
    """
    fn = "sigmoid_loss_sharded"
    _check_same_shape(fn, ("q_BxD", "d_BxD"), (q_BxD, d_BxD))
    _check_positive(fn, "t", t)
    axes = _as_axes(axis_names)
    B = q_BxD.shape[0]
    n = _ring_size(fn, mesh, axes, B)

    def body(q_bxD, d_bxD, t, bias):
        t_v, bias_v = (jax.lax.pcast(x, axes, to="varying") for x in (t, bias))
        loss, pos_b, neg, max_neg_b = _ring_sigmoid(axes, n, q_bxD, d_bxD, t_v, bias_v)
        pos_b, neg, max_neg_b = jax.lax.stop_gradient((pos_b, neg, max_neg_b))
        sums = jax.lax.psum({"loss": loss, "accuracy": jnp.sum((pos_b > max_neg_b).astype(jnp.float32)),
                             "pos": jnp.sum(pos_b), "neg": neg}, axes)
        return sums["loss"] / B, {"accuracy": sums["accuracy"] / B, "pos_logit": sums["pos"] / B,
                                  "neg_logit": sums["neg"] / max(B * (B - 1), 1), "t": t, "b": bias}

    return jax.shard_map(body, mesh=mesh, in_specs=(P(axes, None), P(axes, None), P(), P()), out_specs=P())(
        _float(q_BxD), _float(d_BxD), _float(t), _float(b))


# ------------------------------------------------------------------ in-batch softmax as a ring (ppermute)


def _varying(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """`x` as a value that differs per device along `axes` (what a ring's scan carries)."""
    missing = tuple(a for a in axes if a not in jax.typeof(x).manual_axis_type.varying)
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _ring_chunk_logits(rows_bxD, cols_cxD, valid_c, t, margin: float, own: bool, self_col: int | None):
    """Logits of this device's rows against one chunk of columns, and the mask of columns that count.

    In the own chunk (``own``), column ``i`` is row ``i``'s positive (shifted by the margin) and column
    ``self_col + i`` (the row itself, a same-tower query) does not count."""
    b, c = rows_bxD.shape[0], cols_cxD.shape[0]
    sims = rows_bxD @ cols_cxD.T
    ok = jnp.broadcast_to(valid_c[None, :], (b, c))
    shifted = sims
    if own:
        eye = jnp.arange(c)[None, :] == jnp.arange(b)[:, None]
        if margin:
            shifted = sims - margin * eye
        if self_col is not None:
            ok = ok & ~(jnp.arange(c)[None, :] == self_col + jnp.arange(b)[:, None])
    return sims, shifted / t, ok


def _ring_softmax_forward(axes, n, margin, self_col, rows_bxD, cols_cxD, valid_c, t):
    """Per-row logsumexp over the columns of every device (online, one chunk at a time), plus the metric
    parts: each row's largest non-positive similarity and the sum of the document similarities."""
    b = rows_bxD.shape[0]

    def fold(carry, sims, logits, ok, own):
        m, s, best, doc_sum = carry
        logits = jnp.where(ok, logits, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(logits, axis=1))
        safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        s = s * jnp.exp(jnp.where(jnp.isfinite(m), m - safe, -jnp.inf)) + \
            jnp.sum(jnp.exp(logits - safe[:, None]), axis=1)
        other = ok & ~(jnp.arange(sims.shape[1])[None, :] == jnp.arange(b)[:, None]) if own else ok
        best = jnp.maximum(best, jnp.max(jnp.where(other, sims, -jnp.inf), axis=1))
        return m_new, s, best, doc_sum + jnp.sum(sims[:, :b])

    neg_inf = jnp.full((b,), -jnp.inf, rows_bxD.dtype)
    carry = (neg_inf, jnp.zeros((b,), rows_bxD.dtype), neg_inf, jnp.zeros((), rows_bxD.dtype))
    sims, logits, ok = _ring_chunk_logits(rows_bxD, cols_cxD, valid_c, t, margin, True, self_col)
    carry = fold(carry, sims, logits, ok, True)

    def step(state, _):
        cols, valid, carry = state
        cols, valid = jax.lax.ppermute((cols, valid), axes, _ring_perm(n))
        sims, logits, ok = _ring_chunk_logits(rows_bxD, cols, valid, t, margin, False, None)
        return (cols, valid, fold(carry, sims, logits, ok, False)), None

    (_, _, (m, s, best, doc_sum)), _ = jax.lax.scan(step, (cols_cxD, valid_c, carry), None, length=n - 1)
    return m + jnp.log(s), best, doc_sum


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _ring_softmax(axes, n, margin, self_col, rows_bxD, cols_cxD, valid_c, t):
    return _ring_softmax_forward(axes, n, margin, self_col, rows_bxD, cols_cxD, valid_c, t)


def _ring_softmax_fwd(axes, n, margin, self_col, rows_bxD, cols_cxD, valid_c, t):
    out = _ring_softmax_forward(axes, n, margin, self_col, rows_bxD, cols_cxD, valid_c, t)
    return out, (rows_bxD, cols_cxD, valid_c, t, out[0])   # inputs and the logsumexp: chunks are re-rotated


def _ring_softmax_bwd(axes, n, margin, self_col, res, cts):
    """Gradient of the per-row logsumexp (the metric outputs are stop_gradient-ed by the caller): the
    softmax of each chunk's logits, computed again as the chunk comes round, its column gradient travelling
    with it; one more rotation brings every column gradient home."""
    rows_bxD, cols_cxD, valid_c, t, lse_b = res
    g_b = cts[0]

    def block(cols, valid, own):
        _, logits, ok = _ring_chunk_logits(rows_bxD, cols, valid, t, margin, own, self_col if own else None)
        p = jnp.where(ok, jnp.exp(logits - lse_b[:, None]), 0.0) * g_b[:, None]
        return (p @ cols) / t, (p.T @ rows_bxD) / t, -jnp.sum(p * jnp.where(ok, logits, 0.0)) / t

    drows, dcols_acc, dt = block(cols_cxD, valid_c, True)

    def step(state, _):
        cols, valid, dcols_acc, drows, dt = state
        cols, valid, dcols_acc = jax.lax.ppermute((cols, valid, dcols_acc), axes, _ring_perm(n))
        gr, gc, gt = block(cols, valid, False)
        return (cols, valid, dcols_acc + gc, drows + gr, dt + gt), None

    (_, _, dcols_acc, drows, dt), _ = jax.lax.scan(step, (cols_cxD, valid_c, dcols_acc, drows, dt), None,
                                                   length=n - 1)
    dcols = jax.lax.ppermute(dcols_acc, axes, _ring_perm(n)) if n > 1 else dcols_acc
    return drows, dcols, None, dt


_ring_softmax.defvjp(_ring_softmax_fwd, _ring_softmax_bwd)


def in_batch_softmax_ring(q_BxD: jax.Array, d_BxD: jax.Array, *, temperature: Any, mesh: Mesh,
                          axis_names: str | Sequence[str] | None = None,
                          hard_negatives_BxKxD: jax.Array | None = None, bidirectional: bool = True,
                          same_tower: bool = False, margin: float = 0.0,
                          hard_negatives_valid_BxK: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
    """:func:`in_batch_softmax` as a ``shard_map`` ring: each device keeps its ``b`` queries; its documents
    (with its hard negatives and, for ``same_tower``, its queries) travel around the devices of
    ``axis_names`` with ``ppermute``, one chunk at a time, and each row's logsumexp is accumulated online. A
    custom VJP rotates the chunks again for the gradients. No device holds the global documents or more
    than one ``b x (b + b*K + b)`` logits block; communication is ``n - 1`` neighbour exchanges instead of
    one all-gather. With ``bidirectional`` a second ring rotates the queries for the document->query loss.
    Same value and gradients as the dense form (the top-1 metrics count ties as correct).
    """
    fn = "in_batch_softmax_ring"
    _in_batch_validate(fn, q_BxD, d_BxD, temperature, hard_negatives_BxKxD, margin)
    axes = _as_axes(axis_names)
    B, D = q_BxD.shape
    n = _ring_size(fn, mesh, axes, B)
    margin = float(margin)
    with_hn = hard_negatives_BxKxD is not None
    with_valid = with_hn and hard_negatives_valid_BxK is not None

    def direction(rows, cols, valid, t, self_col):
        lse_b, best_b, doc_sum = _ring_softmax(axes, n, margin, self_col, rows, cols, valid, t)
        best_b, doc_sum = jax.lax.stop_gradient((best_b, doc_sum))
        pos_b = jnp.sum(rows * cols[:rows.shape[0]], axis=1)          # own chunk: column i is row i's positive
        loss = jnp.sum(lse_b - (pos_b - margin) / t)
        correct = jnp.sum((jax.lax.stop_gradient(pos_b) >= best_b).astype(jnp.float32))
        return loss, correct, jax.lax.stop_gradient(pos_b), doc_sum

    def body(q_bxD, d_bxD, temp, *hn):
        b = q_bxD.shape[0]
        t = jax.lax.pcast(temp, axes, to="varying")
        cols, valid = [d_bxD], [jnp.ones((b,), bool)]
        if with_hn:
            cols.append(hn[0].reshape(-1, D))
            valid.append(hn[1].reshape(-1) if with_valid else jnp.ones((hn[0].shape[0] * hn[0].shape[1],), bool))
        self_col = None
        if same_tower:
            self_col = sum(c.shape[0] for c in cols)
            cols.append(q_bxD)
            valid.append(jnp.ones((b,), bool))
        loss, correct, pos_b, doc_sum = direction(q_bxD, jnp.concatenate(cols), _varying(jnp.concatenate(valid), axes),
                                                  t, self_col)
        pos_sum = jnp.sum(pos_b)
        sums = {"loss_q2d": loss, "accuracy": correct, "pos_sim": pos_sum, "neg_sim": doc_sum - pos_sum}
        if bidirectional:
            loss, correct, _, _ = direction(d_bxD, q_bxD, _varying(jnp.ones((b,), bool), axes), t, None)
            sums["loss_d2q"], sums["accuracy_d2q"] = loss, correct
        return _in_batch_finish(jax.lax.psum(sums, axes), B, temp)

    return _shard_map_in_batch(body, mesh, axes, q_BxD, d_BxD, temperature, hard_negatives_BxKxD,
                               hard_negatives_valid_BxK if with_valid else None)


# ------------------------------------------------------------------------------------ scored pairs (STS)


def _cosent_from_sims(sims_B: jax.Array, scores_B: jax.Array, scale: float) -> tuple[jax.Array, jax.Array]:
    """``log(1 + sum_{s_i < s_j} exp(scale * (sim_i - sim_j)))`` and the pairwise ordering accuracy."""
    lower_BxB = scores_B[:, None] < scores_B[None, :]  # pair i should score below pair j
    diff_BxB = scale * (sims_B[:, None] - sims_B[None, :])
    terms = jnp.where(lower_BxB, diff_BxB, -jnp.inf).reshape(-1)
    loss = jax.nn.logsumexp(jnp.concatenate([jnp.zeros((1,), terms.dtype), terms]))
    n_ordered = jnp.sum(lower_BxB.astype(jnp.float32))
    right = jnp.sum((lower_BxB & (sims_B[:, None] < sims_B[None, :])).astype(jnp.float32))
    return loss, right / jnp.maximum(n_ordered, 1.0)


def _check_scored(fn: str, a_BxD: Any, b_BxD: Any, scores_B: Any) -> None:
    _check_same_shape(fn, ("a_BxD", "b_BxD"), (a_BxD, b_BxD))
    if tuple(getattr(scores_B, "shape", ())) != (a_BxD.shape[0],):
        raise _err(fn, f"scores_B must have shape [B] = [{a_BxD.shape[0]}], "
                       f"got {getattr(scores_B, 'shape', type(scores_B).__name__)}")


def cosent_loss(a_BxD: jax.Array, b_BxD: jax.Array, scores_B: jax.Array, *,
                scale: float = 20.0) -> tuple[jax.Array, Metrics]:
    """CoSENT (Su, 2022) for scored pairs such as STS-B: for every two pairs of the global batch whose gold
    scores are ordered, penalise the cosine similarities for the opposite order,
    ``log(1 + sum_{s_i < s_j} exp(scale * (cos_i - cos_j)))``. Only the order of the scores matters.

    Metrics: ``accuracy`` (fraction of gold-ordered pairs of pairs the cosines order the same way),
    ``pos_sim`` (mean cosine of the pairs).
    """
    _check_scored("cosent_loss", a_BxD, b_BxD, scores_B)
    cos_B = jnp.sum(l2_normalize(_float(a_BxD)) * l2_normalize(_float(b_BxD)), axis=-1)
    loss, acc = _cosent_from_sims(cos_B, _float(scores_B), scale)
    return loss, {"accuracy": acc, "pos_sim": jnp.mean(cos_B)}


def angle_similarity(a_BxD: jax.Array, b_BxD: jax.Array) -> jax.Array:
    """AnglE's similarity (arXiv 2309.12871): halves of each vector as real / imaginary parts, the complex
    quotient ``a / b`` normalised by ``|a| / |b|``, summed over real and imaginary parts, absolute value."""
    re_a, im_a = jnp.split(a_BxD, 2, axis=-1)
    re_b, im_b = jnp.split(b_BxD, 2, axis=-1)
    sq_a = jnp.sum(re_a**2 + im_a**2, axis=-1, keepdims=True)
    sq_b = jnp.sum(re_b**2 + im_b**2, axis=-1, keepdims=True)
    # (re_a + i im_a) / (re_b + i im_b) = ((re_a re_b + im_a im_b) + i (im_a re_b - re_a im_b)) / |b|^2,
    # then divided by |a| / |b|: overall by |a| |b|.
    denom = jnp.sqrt(sq_a * sq_b)
    re = (re_a * re_b + im_a * im_b) / denom
    im = (im_a * re_b - re_a * im_b) / denom
    return jnp.abs(jnp.sum(re, axis=-1) + jnp.sum(im, axis=-1))


def angle_loss(a_BxD: jax.Array, b_BxD: jax.Array, scores_B: jax.Array, *, scale: float = 20.0,
               cosine_weight: float = 0.0) -> tuple[jax.Array, Metrics]:
    """AnglE: the CoSENT ranking objective on :func:`angle_similarity` (as sentence-transformers'
    ``AnglELoss``), plus ``cosine_weight`` times :func:`cosent_loss` (the paper combines both).
    ``D`` must be even. Metrics as :func:`cosent_loss` (``accuracy`` ordered by the angle similarity).
    """
    fn = "angle_loss"
    _check_scored(fn, a_BxD, b_BxD, scores_B)
    if a_BxD.shape[1] % 2:
        raise _err(fn, f"the embedding dim must be even (real and imaginary halves), got {a_BxD.shape[1]}")
    a, b, s = _float(a_BxD), _float(b_BxD), _float(scores_B)
    loss, acc = _cosent_from_sims(angle_similarity(a, b), s, scale)
    metrics = {"accuracy": acc, "angle_loss": loss}
    if cosine_weight:
        cos_loss, cos_m = cosent_loss(a, b, s, scale=scale)
        loss = loss + cosine_weight * cos_loss
        metrics.update(cosent_loss=cos_loss, pos_sim=cos_m["pos_sim"])
    return loss, metrics


# ------------------------------------------------------------------------------------------ distillation


def distill_kl(student_logits_BxN: jax.Array, teacher_scores_BxN: jax.Array, *, student_temperature: Any,
               teacher_temperature: Any, mask_BxN: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
    """``KL(teacher || student)`` between score distributions over each row's in-batch candidates
    (knowledge distillation; Gecko-style relabelling where a teacher scores the candidates):
    ``p = softmax(teacher / teacher_temperature)``, ``q = softmax(student / student_temperature)``,
    mean over rows of ``sum_j p_j (log p_j - log q_j)``. ``mask_BxN`` (True = candidate) excludes
    entries, e.g. the mask :func:`candidate_scores` returns. The teacher gets no gradient.

    Metrics: ``accuracy`` (rows where the student's top candidate is the teacher's), ``teacher_entropy``.
    """
    fn = "distill_kl"
    s, tch = student_logits_BxN, teacher_scores_BxN
    _check_same_shape(fn, ("student_logits_BxN", "teacher_scores_BxN"), (s, tch))
    if mask_BxN is not None and tuple(mask_BxN.shape) != tuple(s.shape):
        raise _err(fn, f"mask_BxN must have shape {tuple(s.shape)}, got {tuple(mask_BxN.shape)}")
    _check_positive(fn, "student_temperature", student_temperature)
    _check_positive(fn, "teacher_temperature", teacher_temperature)
    s = _float(s) / _float(student_temperature)
    tch = jax.lax.stop_gradient(_float(tch)) / _float(teacher_temperature)
    valid = jnp.ones(s.shape, bool) if mask_BxN is None else jnp.asarray(mask_BxN, bool)
    log_q = jax.nn.log_softmax(jnp.where(valid, s, -jnp.inf), axis=-1)
    log_p = jax.nn.log_softmax(jnp.where(valid, tch, -jnp.inf), axis=-1)
    # Masked entries get 0 instead of 0 * (-inf - -inf): no NaN in the value or the gradient.
    log_q, log_p = jnp.where(valid, log_q, 0.0), jnp.where(valid, log_p, 0.0)
    p = jnp.where(valid, jnp.exp(log_p), 0.0)
    kl_B = jnp.sum(p * (log_p - log_q), axis=-1)
    agree = jnp.argmax(jnp.where(valid, s, -jnp.inf), -1) == jnp.argmax(jnp.where(valid, tch, -jnp.inf), -1)
    return jnp.mean(kl_B), {"accuracy": jnp.mean(agree.astype(jnp.float32)),
                            "teacher_entropy": -jnp.mean(jnp.sum(p * log_p, axis=-1))}


def margin_mse(q_BxD: jax.Array, pos_BxD: jax.Array, neg_BxD: jax.Array, teacher_pos_B: jax.Array,
               teacher_neg_B: jax.Array, *, scale: float = 1.0,
               valid: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
    """MarginMSE (Hofstätter et al., arXiv 2010.02666): the student's margin
    ``scale * (<q, pos> - <q, neg>)`` regresses onto the teacher's ``teacher_pos - teacher_neg``.
    ``neg`` may carry ``K`` negatives per query (``neg_BxKxD`` with ``teacher_neg_BxK``); ``scale``
    brings cosine similarities to the range of the teacher's scores.
    ``valid`` (bool, the shape of ``teacher_neg``) keeps only the (query, negative) pairs that exist (padding
    slots of rows with fewer negatives, or without teacher scores, are left out of the mean).

    Metrics: ``accuracy`` (student scores the positive above the negative), ``student_margin``,
    ``teacher_margin``.
    """
    fn = "margin_mse"
    _check_same_shape(fn, ("q_BxD", "pos_BxD"), (q_BxD, pos_BxD))
    B, D = q_BxD.shape
    multi = getattr(neg_BxD, "ndim", 0) == 3
    want_neg = (B, neg_BxD.shape[1], D) if multi else (B, D)
    want_tn = (B, neg_BxD.shape[1]) if multi else (B,)
    if tuple(neg_BxD.shape) != want_neg:
        raise _err(fn, f"neg_BxD must have shape [B, D] or [B, K, D] with B={B}, D={D}, "
                       f"got {tuple(neg_BxD.shape)}")
    for name, x, want in (("teacher_pos_B", teacher_pos_B, (B,)), ("teacher_neg_B", teacher_neg_B, want_tn)):
        if tuple(getattr(x, "shape", ())) != want:
            raise _err(fn, f"{name} must have shape {list(want)}, got {tuple(getattr(x, 'shape', ()))}")
    q, pos, neg = _float(q_BxD), _float(pos_BxD), _float(neg_BxD)
    s_pos = scale * jnp.sum(q * pos, axis=-1)
    s_neg = scale * (jnp.einsum("bd,bkd->bk", q, neg) if multi else jnp.sum(q * neg, axis=-1))
    if multi:
        s_pos = s_pos[:, None]
    tp, tn = (jax.lax.stop_gradient(_float(x)) for x in (teacher_pos_B, teacher_neg_B))
    t_margin = (tp[:, None] if multi else tp) - tn
    s_margin = s_pos - s_neg
    if valid is None:
        w = jnp.ones(s_margin.shape, jnp.float32)
    else:
        if tuple(valid.shape) != tuple(s_margin.shape):
            raise _err(fn, f"valid must have shape {tuple(s_margin.shape)}, got {tuple(valid.shape)}")
        w = jnp.asarray(valid).astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)

    def mean(x):
        return jnp.sum(w * x) / n
    return mean(jnp.square(s_margin - t_margin)), {
        "accuracy": mean((s_margin > 0).astype(jnp.float32)),
        "student_margin": mean(s_margin), "teacher_margin": mean(t_margin)}


# ------------------------------------------------------------------------------------------- Matryoshka


def matryoshka(loss_fn: LossFn, dims: Sequence[int], weights: Sequence[float] | None = None, *,
               normalize: bool = True, embedding_argnums: Sequence[int] | None = None,
               embedding_kwargs: Sequence[str] = ("hard_negatives_BxKxD",)) -> LossFn:
    """Matryoshka representation learning (arXiv 2205.13147): ``loss_fn`` applied to nested prefixes of the
    embeddings, ``sum_k weights[k] * loss_fn(x[..., :dims[k]])``.

    ``normalize``: re-normalise each prefix to unit length (set it when the model's embeddings are
    unit-norm, so that every prefix is used with cosine similarity as it will be served); the full-size
    prefix is left untouched. Embedding arguments are the positional arguments ``embedding_argnums``
    (default: every array argument with ndim >= 2 whose last dim equals the first argument's) and the
    keyword arguments named in ``embedding_kwargs``; everything else (scores, temperature, mesh) passes
    through. Metrics are ``loss_fn``'s at the largest prefix plus ``loss_dim{d}`` for every prefix.
    """
    dims_t = tuple(int(d) for d in dims)
    if not dims_t or min(dims_t) <= 0 or len(set(dims_t)) != len(dims_t):
        raise _err("matryoshka", f"dims must be distinct positive ints, got {list(dims)}")
    weights_t = tuple(float(w) for w in weights) if weights is not None else (1.0,) * len(dims_t)
    if len(weights_t) != len(dims_t):
        raise _err("matryoshka", f"{len(weights_t)} weights for {len(dims_t)} dims {list(dims_t)}")
    largest = max(dims_t)

    def wrapped(*args: Any, **kwargs: Any) -> tuple[jax.Array, Metrics]:
        D = args[0].shape[-1]
        if largest > D:
            raise _err("matryoshka", f"dims {list(dims_t)} exceed the embedding dim {D}")
        if embedding_argnums is None:
            argnums = {i for i, a in enumerate(args) if getattr(a, "ndim", 0) >= 2 and a.shape[-1] == D}
        else:
            argnums = set(embedding_argnums)

        def cut(x: jax.Array, dim: int) -> jax.Array:
            if dim == x.shape[-1]:
                return x
            x = x[..., :dim]
            return l2_normalize(_float(x)) if normalize else x

        total, metrics, per_dim = 0.0, {}, {}
        for dim, w in zip(dims_t, weights_t):
            a = [cut(x, dim) if i in argnums else x for i, x in enumerate(args)]
            kw = {k: (cut(v, dim) if k in embedding_kwargs and v is not None else v)
                  for k, v in kwargs.items()}
            loss, m = loss_fn(*a, **kw)
            total = total + w * loss
            per_dim[f"loss_dim{dim}"] = loss
            if dim == largest:
                metrics = dict(m)
        return total, {**metrics, **per_dim}

    wrapped.__name__ = f"matryoshka_{getattr(loss_fn, '__name__', 'loss')}"
    wrapped.__doc__ = (f"Matryoshka over dims {list(dims_t)} (weights {list(weights_t)}) of:\n"
                       f"{loss_fn.__doc__}")
    return wrapped


# ----------------------------------------------------------------------- quantisation-aware training, spread-out

QAT_PRECISIONS = ("binary", "int8")


def quantize_ste(x: jax.Array, precision: str) -> jax.Array:
    """The embeddings as their `precision` codes will score (embedjax.quantize), with a straight-through
    gradient (the identity: normalised embeddings lie within [-1, 1], where sign and rounding are clipped no
    further). binary: ``sign(x) / sqrt(D)``, a unit vector whose dot products are ``1 - 2 hamming / D``;
    int8: each dimension on 256 levels between its minimum and maximum over the batch (as a calibration sample
    would give them)."""
    x = _float(x)
    if precision == "binary":
        q = jnp.where(x > 0, 1.0, -1.0) / jnp.sqrt(jnp.float32(x.shape[-1]))
    elif precision == "int8":
        flat = jax.lax.stop_gradient(x.reshape(-1, x.shape[-1]))
        lo, hi = flat.min(axis=0), flat.max(axis=0)
        step = jnp.where(hi > lo, (hi - lo) / 255.0, 1.0)
        q = jnp.clip(jnp.floor((x - lo) / step), 0, 255) * step + lo
    else:
        raise _err("quantize_ste", f"precision must be one of {QAT_PRECISIONS}, got {precision!r}")
    return x + jax.lax.stop_gradient(q - x)


def quantization_aware(loss_fn: LossFn, precision: str, weight: float = 1.0, *,
                       embedding_argnums: Sequence[int] = (0, 1),
                       embedding_kwargs: Sequence[str] = ("hard_negatives_BxKxD",)) -> LossFn:
    """Quantisation-aware training: ``loss_fn(x) + weight * loss_fn(quantize_ste(x))`` so that the embeddings
    also rank well once stored as `precision` codes (binary: searched by Hamming distance). Metrics are
    ``loss_fn``'s on the float embeddings plus ``loss_float`` and ``loss_{precision}``."""
    if precision not in QAT_PRECISIONS:
        raise _err("quantization_aware", f"precision must be one of {QAT_PRECISIONS}, got {precision!r}")

    def wrapped(*args: Any, **kwargs: Any) -> tuple[jax.Array, Metrics]:
        loss, metrics = loss_fn(*args, **kwargs)
        qa = [quantize_ste(x, precision) if i in embedding_argnums else x for i, x in enumerate(args)]
        qk = {k: (quantize_ste(v, precision) if k in embedding_kwargs and v is not None else v)
              for k, v in kwargs.items()}
        q_loss, _ = loss_fn(*qa, **qk)
        return loss + weight * q_loss, {**metrics, "loss_float": loss, f"loss_{precision}": q_loss}

    wrapped.__name__ = f"qat_{precision}_{getattr(loss_fn, '__name__', 'loss')}"
    return wrapped


def spread_out(q_BxD: jax.Array, d_BxD: jax.Array) -> jax.Array:
    """The global orthogonal regulariser of Zhang et al. 2017 ("Learning Spread-out Local Feature
    Descriptors"): over the non-matching pairs (i != j), ``mean(s)^2 + max(0, mean(s^2) - 1/D)`` with s the
    cosine of query i and document j; pushes unrelated embeddings towards uniformly spread directions, which
    keeps information through binarisation."""
    q, d = l2_normalize(_float(q_BxD)), l2_normalize(_float(d_BxD))
    B, D = q.shape
    s = q @ d.T
    off = 1.0 - jnp.eye(B, dtype=s.dtype)
    n = jnp.maximum(off.sum(), 1.0)
    m1 = jnp.sum(s * off) / n
    m2 = jnp.sum(jnp.square(s) * off) / n
    return jnp.square(m1) + jax.nn.relu(m2 - 1.0 / D)


def with_spread_out(loss_fn: LossFn, weight: float) -> LossFn:
    """``loss_fn + weight * spread_out(queries, documents)`` (the first two arguments); metric ``spread_out``."""
    def wrapped(*args: Any, **kwargs: Any) -> tuple[jax.Array, Metrics]:
        loss, metrics = loss_fn(*args, **kwargs)
        reg = spread_out(args[0], args[1])
        return loss + weight * reg, {**metrics, "spread_out": reg}

    wrapped.__name__ = f"spread_out_{getattr(loss_fn, '__name__', 'loss')}"
    return wrapped


# --------------------------------------------------------------------------------------------- registry

# name -> (function, positional embedding arguments for Matryoshka; None: Matryoshka does not apply)
_LOSSES: dict[str, tuple[LossFn, tuple[int, ...] | None]] = {
    "in_batch_softmax": (in_batch_softmax, (0, 1)),
    "in_batch_softmax_sharded": (in_batch_softmax_sharded, (0, 1)),
    "in_batch_softmax_ring": (in_batch_softmax_ring, (0, 1)),
    "sigmoid": (sigmoid_loss, (0, 1)),
    "sigmoid_sharded": (sigmoid_loss_sharded, (0, 1)),
    "cosent": (cosent_loss, (0, 1)),
    "angle": (angle_loss, (0, 1)),
    "distill_kl": (distill_kl, None),
    "margin_mse": (margin_mse, (0, 1, 2)),
}
_ALIASES = {"infonce": "in_batch_softmax", "softmax": "in_batch_softmax", "siglip": "sigmoid",
            "sigmoid_loss": "sigmoid", "cosent_loss": "cosent", "angle_loss": "angle", "kl": "distill_kl"}
LOSS_NAMES: tuple[str, ...] = tuple(_LOSSES)


def get_loss(name: str, **options: Any) -> LossFn:
    """A loss by name with its keyword options bound, for configs: ``get_loss("in_batch_softmax",
    temperature=0.01, same_tower=True)``. Options not bound here (a learned temperature, a mesh) can be
    passed at call time. ``matryoshka_dims`` / ``matryoshka_weights`` / ``matryoshka_normalize`` wrap the
    loss with :func:`matryoshka`. Names: ``LOSS_NAMES`` (aliases: infonce, softmax, siglip, kl, ...).
    """
    key = _ALIASES.get(name.lower().replace("-", "_"), name.lower().replace("-", "_"))
    if key not in _LOSSES:
        raise ValueError(f"embedjax.losses.get_loss: unknown loss {name!r}; known: {', '.join(LOSS_NAMES)}")
    fn, argnums = _LOSSES[key]
    mat = {k: options.pop(k) for k in ("matryoshka_dims", "matryoshka_weights", "matryoshka_normalize")
           if k in options}
    qat = {k: options.pop(k) for k in ("quantization_aware", "quantization_weight", "spread_out_weight")
           if k in options}
    params = inspect.signature(fn).parameters
    allowed = sorted(p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        valid = allowed + ["matryoshka_dims", "matryoshka_weights", "matryoshka_normalize", "quantization_aware",
                           "quantization_weight", "spread_out_weight"]
        raise ValueError(f"embedjax.losses.get_loss({name!r}): unknown option(s) {unknown}; valid: {valid}")
    loss = functools.partial(fn, **options) if options else fn
    if qat.get("quantization_aware") or qat.get("spread_out_weight"):
        if argnums is None:
            raise ValueError(f"embedjax.losses.get_loss({name!r}): quantisation-aware training and the spread-out "
                             f"regulariser need embeddings, but {key} takes scores")
        if qat.get("spread_out_weight"):
            if key.endswith(("_sharded", "_ring")):
                raise ValueError(f"embedjax.losses.get_loss({name!r}): spread_out_weight forms the dense [B, B] "
                                 "similarity matrix, which the shard_map forms never hold; use the dense form")
            loss = with_spread_out(loss, float(qat["spread_out_weight"]))
        if qat.get("quantization_aware"):   # inside Matryoshka: each prefix is quantised as it will be stored
            loss = quantization_aware(loss, qat["quantization_aware"], float(qat.get("quantization_weight", 1.0)),
                                      embedding_argnums=argnums)
    elif "quantization_weight" in qat:
        raise ValueError(f"embedjax.losses.get_loss({name!r}): quantization_weight given without "
                         "quantization_aware")
    if mat.get("matryoshka_dims"):
        if argnums is None:
            raise ValueError(f"embedjax.losses.get_loss({name!r}): Matryoshka needs embeddings, "
                             f"but {key} takes scores")
        loss = matryoshka(loss, mat["matryoshka_dims"], mat.get("matryoshka_weights"),
                          normalize=mat.get("matryoshka_normalize", True), embedding_argnums=argnums)
    elif "matryoshka_weights" in mat:
        raise ValueError(f"embedjax.losses.get_loss({name!r}): matryoshka_weights given without "
                         "matryoshka_dims")
    return loss
