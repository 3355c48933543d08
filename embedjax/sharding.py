"""The only module that knows physical mesh axes.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel + parameter sharding), `tensor` (tensor parallel).
Models annotate parameters with logical names (see embedjax.models.layers); `LOGICAL_RULES` maps them to mesh
axes. Batches are sharded over ("data", "fsdp").
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from embedjax import errors

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated). One table for every model.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("proj", "tensor"),
    ("pos", None),
    ("norm", None),
    ("latents", None),          # the learned latent array of latent-attention pooling (dual_encoder)
    ("layers", None),           # the stacked layer axis of scanned layers (`scan_layers`)
    # activations (models name them through `logical_constraint`, t5x / MaxText style)
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
)


ShardingError = errors.ShardingError   # defined in embedjax/errors.py (one module of error types)


def make_mesh(shape: Mapping[str, int] | Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh. One entry may be -1 (all remaining devices)."""
    devices = list(devices) if devices is not None else jax.devices()
    if isinstance(shape, Mapping):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ShardingError(f"unknown mesh axes {sorted(unknown)}; axes are {MESH_AXES}")
        dims = [int(shape.get(a, 1)) for a in MESH_AXES]
    else:
        dims = [int(x) for x in shape]
        if len(dims) != 3:
            raise ShardingError(f"mesh shape must have 3 entries (data, fsdp, tensor), got {dims}")
    if dims.count(-1) > 1:
        raise ShardingError(f"at most one mesh axis may be -1, got {dims}")
    if -1 in dims:
        rest = math.prod(d for d in dims if d != -1)
        if len(devices) % rest:
            raise ShardingError(f"{len(devices)} devices cannot be split as {dims}")
        dims[dims.index(-1)] = len(devices) // rest
    if math.prod(dims) != len(devices):
        raise ShardingError(f"mesh {dict(zip(MESH_AXES, dims))} needs {math.prod(dims)} devices, "
                            f"{len(devices)} available")
    try:
        from jax.experimental import mesh_utils
        arr = mesh_utils.create_device_mesh(dims, devices=devices)
    except Exception:  # non-TPU or odd topologies
        arr = np.asarray(devices).reshape(dims)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def single_device_mesh(device: Any = None) -> Mesh:
    """A mesh of one device (every axis of size 1): this host's first device by default."""
    return make_mesh({a: 1 for a in MESH_AXES}, devices=[device or jax.local_devices()[0]])


def _rules_dict(rules: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    return dict(rules)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None,
                    rules: Iterable[tuple[str, Any]] = LOGICAL_RULES, what: str = "array") -> P:
    """PartitionSpec for an array with logical axis `names`.

    Fails loudly when two logical axes land on the same mesh axis. A dimension not divisible by its mesh
    axes' size is replicated instead (logged), so odd vocabularies still work.
    """
    table = _rules_dict(rules)
    used: dict[str, str] = {}
    spec: list[Any] = []
    for i, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ShardingError(f"{what}: logical axis {name!r} has no rule; known: {sorted(table)}")
        target = table[name]
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        for a in axes:
            if a in used:
                raise ShardingError(f"{what}: logical axes {used[a]!r} and {name!r} both map to mesh axis {a!r}")
            used[a] = name
        if mesh is not None and shape is not None and axes:
            size = math.prod(mesh.shape[a] for a in axes)
            if shape[i] % size:
                log.debug("%s: dim %d (%s=%d) not divisible by %s=%d; replicated", what, i, name, shape[i], axes, size)
                spec.append(None)
                continue
        spec.append(axes if len(axes) > 1 else (axes[0] if axes else None))
    return P(*spec)


def param_shardings(boxed_params: Any, mesh: Mesh, rules: Iterable[tuple[str, Any]] = LOGICAL_RULES) -> Any:
    """NamedShardings for a (possibly abstract) params tree whose leaves are flax LogicallyPartitioned boxes.
    Unboxed leaves are replicated."""
    import flax.linen as nn

    rules = tuple(rules)

    def one(path, leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            spec = logical_to_spec(leaf.names, leaf.value.shape, mesh, rules, what=jax.tree_util.keystr(path))
            return NamedSharding(mesh, spec)
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, boxed_params,
                                            is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dim over the data axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    """Devices the batch is split over (the batch axes)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def param_shard_size(mesh: Mesh) -> int:
    """Devices each parameter's rows are split over when fully sharded (the fsdp axis)."""
    return mesh.shape["fsdp"]


def tensor_parallel_size(mesh: Mesh) -> int:
    """Devices the hidden / heads / mlp dimensions are split over (the tensor axis)."""
    return mesh.shape["tensor"]


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-host numpy batch -> global jax arrays sharded over the data axes (each host passes its own rows).
    With several processes, rows padded to different bucket lengths on different hosts are padded (zeros:
    masked) to the longest, so every host contributes the same shape."""
    if jax.process_count() > 1:
        local_batch = agree_padding(local_batch)
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in local_batch.items()}


def agree_padding(local_batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Pads every array's non-batch dims to the maximum over all processes (one small allgather)."""
    from jax.experimental import multihost_utils

    keys = sorted(local_batch)
    dims = np.asarray([d for k in keys for d in np.shape(local_batch[k])[1:]], np.int32)
    target = np.max(np.asarray(multihost_utils.process_allgather(dims)).reshape(-1, dims.size), axis=0)
    if np.array_equal(dims, target):
        return dict(local_batch)
    out, i = {}, 0
    for k in keys:
        v = np.asarray(local_batch[k])
        want = target[i: i + v.ndim - 1]
        i += v.ndim - 1
        out[k] = np.pad(v, [(0, 0)] + [(0, int(w) - s) for s, w in zip(v.shape[1:], want)])
    return out


def logical_constraint(x: jax.Array, names: Sequence[str | None],
                       rules: Iterable[tuple[str, Any]] = LOGICAL_RULES) -> jax.Array:
    """Constrains an activation by logical axis names, through the same rules table as the parameters
    (e.g. ("activation_batch", "activation_length", "activation_embed")). Under a mesh with embedjax's axes
    (`jax.set_mesh`, what the trainer does) this keeps the batch dim sharded over the data axes, so XLA does
    not replicate activations to match fsdp-sharded weights (it did: Sentence-T5-XXL on v5e-256 needed 201 GB
    per chip). A no-op without such a mesh, inside shard_map, or where a dimension does not divide."""
    if len(names) != x.ndim:
        raise ShardingError(f"logical_constraint: {len(names)} names {tuple(names)} for a {x.ndim}-d array")
    spec = _activation_spec(names, x.shape, rules)
    if spec is None or all(a is None for a in spec):
        return x
    return jax.lax.with_sharding_constraint(x, P(*spec))


def _activation_spec(names: Sequence[str | None], shape: Sequence[int],
                     rules: Iterable[tuple[str, Any]] = LOGICAL_RULES) -> list[tuple[str, ...] | None] | None:
    """The mesh axes each dimension of an activation is split over under the current (abstract) mesh, as
    `logical_constraint` places it; None when there is no such mesh or inside shard_map / explicit axes."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return None
    table = _rules_dict(rules)
    spec: list[tuple[str, ...] | None] = []
    for name, dim in zip(names, shape):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if any(mesh._name_to_type[a] != AxisType.Auto for a in axes):   # manual (shard_map) or explicit
            return None
        size = math.prod(mesh.shape[a] for a in axes)
        spec.append(axes if axes and size > 1 and dim % size == 0 else None)
    return spec


def activation_batch_shards(batch: int) -> int:
    """How many pieces the batch dimension (size `batch`) of an activation is split into under the current
    mesh (1 without one, or inside shard_map, where arrays are already per device)."""
    spec = _activation_spec(("activation_batch",), (batch,))
    if not spec or spec[0] is None:
        return 1
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[a] for a in spec[0])


ACTIVATION_BxLxD = ("activation_batch", "activation_length", "activation_embed")
