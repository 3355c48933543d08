"""`embedjax aot`: compile the train step ahead of time for a target TPU slice on this (CPU) machine and print
per-device memory, so sharding and batch size are checked before a pod is rented (MaxText's train_compile idea).

    embedjax aot --config configs/sentence_t5.py:xxl --topology v5e-256
    embedjax aot --config configs/tiny.py --topology cpu-8          # this machine's (fake) CPU devices

How: `jax.experimental.topologies.get_topology_desc` (needs libtpu: `pip install 'jax[tpu]'`) gives compile-only
devices of the target slice; the mesh, parameter / optimizer-state / batch shardings and the jitted step are
built exactly as `train_and_evaluate` builds them, from abstract arrays (`jax.eval_shape`, nothing is allocated),
then `jit(step).lower(abstract_state, batch_spec(config, mesh)).compile().memory_analysis()`.

Without libtpu (or with `--estimate-only`) it falls back to the abstract estimate: per-device bytes of params,
gradients, optimizer state and batch from the shardings, plus an analytic activation estimate.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import time
from typing import Any

from embedjax import errors

log = logging.getLogger(__name__)

GiB = 1024 ** 3

# Per-device high-bandwidth memory (one JAX device = one chip for v4 / v5p (megacore), v5e and v6e).
HBM_BYTES = {"v4": 32 * GiB, "v5p": 95 * GiB, "v5e": 16 * GiB, "v6e": 32 * GiB}
# libtpu's name for each generation's topology strings.
_LIBTPU_PREFIX = {"v4": "v4", "v5p": "v5", "v5e": "v5e", "v6e": "v6e"}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "v5": "v5p"}
# Chip grids of the 3-D torus generations (v4, v5p) by chip count; full-torus wrap from 64 chips on.
_GRID_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
            256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
# Chip grids of the 2-D generations (v5e, v6e); a dimension of 16 chips wraps around.
_GRID_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}


AotError = errors.AotError   # defined in embedjax/errors.py (one module of error types)


# --------------------------------------------------------------------------------------------- targets

@dataclasses.dataclass(frozen=True)
class Target:
    """A slice to compile for. `name` is the user-facing accelerator type (as `gcloud --accelerator-type`)."""

    name: str
    platform: str                     # "tpu" | "cpu"
    generation: str = ""              # v4 | v5p | v5e | v6e
    topology_name: str = ""           # libtpu's, e.g. "v5e:16x16"
    chip_config_name: str = "default"  # "megacore" for v4 / v5p
    chips_per_host_bounds: tuple[int, int, int] = (2, 2, 1)
    wrap: tuple[bool, bool, bool] = (False, False, False)
    num_devices: int = 0              # per slice
    num_slices: int = 1
    hbm_bytes: int | None = None      # per device; None: unknown (CPU)

    @property
    def total_devices(self) -> int:
        return self.num_devices * self.num_slices


def parse_topology(name: str, num_slices: int = 1, hbm_gib: float | None = None) -> Target:
    """'v5e-256' | 'v5litepod-16' | 'v4-32' | 'v5p-128' | 'v6e-64' | 'cpu-8' -> Target.

    v4 / v5p counts are TensorCores (2 per chip, one JAX device per chip, as gcloud names them); v5e / v6e
    counts are chips."""
    m = re.fullmatch(r"\s*([a-z0-9]+)-(\d+)\s*", name.lower())
    if not m:
        raise AotError(f"--topology {name!r}: expected GENERATION-SIZE, e.g. v5e-256, v4-32, v5p-128, v6e-64, cpu-8")
    gen, size = _ALIASES.get(m.group(1), m.group(1)), int(m.group(2))
    if num_slices < 1:
        raise AotError(f"--num-slices {num_slices}: must be >= 1")
    hbm = int(hbm_gib * GiB) if hbm_gib else None
    if gen == "cpu":
        if size < 1:
            raise AotError(f"--topology {name!r}: need at least 1 CPU device")
        if num_slices != 1:
            raise AotError("--num-slices applies to TPU topologies only")
        return Target(name=name, platform="cpu", num_devices=size, hbm_bytes=hbm)
    if gen not in HBM_BYTES:
        raise AotError(f"--topology {name!r}: unknown TPU generation {m.group(1)!r}; known: "
                       f"{', '.join(sorted(HBM_BYTES))} (and cpu)")
    if gen in ("v4", "v5p"):
        if size % 2 or size // 2 not in _GRID_3D:
            raise AotError(f"--topology {name!r}: {gen} sizes count TensorCores (2 per chip); supported: "
                           + ", ".join(f"{gen}-{2 * c}" for c in _GRID_3D))
        chips = size // 2
        grid = _GRID_3D[chips]
        wrap = (chips >= 64,) * 3
        host = (2, 2, 1)
        cfg = "megacore"
    else:
        if size not in _GRID_2D:
            raise AotError(f"--topology {name!r}: supported {gen} sizes: " + ", ".join(str(c) for c in _GRID_2D))
        chips = size
        grid = _GRID_2D[chips] + (1,)
        wrap = (grid[0] == 16, grid[1] == 16, False)
        host = (1, 1, 1) if chips == 1 else ((2, 4, 1) if chips == 8 else (2, 2, 1))
        cfg = "default"
    dims = grid if gen in ("v4", "v5p") else grid[:2]
    topo = f"{_LIBTPU_PREFIX[gen]}:" + "x".join(str(d) for d in dims)
    return Target(name=f"{gen}-{size}", platform="tpu", generation=gen, topology_name=topo, chip_config_name=cfg,
                  chips_per_host_bounds=host, wrap=wrap, num_devices=chips, num_slices=num_slices,
                  hbm_bytes=hbm or HBM_BYTES[gen])


def _quiet_libtpu(target: Target) -> None:
    """libtpu reads the TPU VM's metadata through env vars; off a TPU VM it logs errors unless they are set."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # Any other JAX process of this environment that probed for a TPU holds /tmp/libtpu_lockfile; a
    # compile-only client touches no chip, so it may share the library.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.name.replace("v5e-", "v5litepod-"))
    os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")


def target_devices(target: Target) -> list:
    """Compile-only TPU devices of the target (needs libtpu), or this machine's CPU devices."""
    import jax

    if target.platform == "cpu":
        devs = jax.devices("cpu")
        if len(devs) < target.num_devices:
            raise AotError(f"--topology {target.name}: only {len(devs)} CPU devices; run with "
                           f"XLA_FLAGS=--xla_force_host_platform_device_count={target.num_devices}")
        return devs[:target.num_devices]
    from jax.experimental.topologies import get_topology_desc

    _quiet_libtpu(target)
    topo = get_topology_desc(platform="tpu", topology_name=target.topology_name,
                             chip_config_name=target.chip_config_name,
                             chips_per_host_bounds=target.chips_per_host_bounds,
                             num_slices=target.num_slices, wrap=target.wrap)
    devs = list(topo.devices)
    if len(devs) != target.total_devices:
        raise AotError(f"libtpu described {len(devs)} devices for {target.name}, expected {target.total_devices}")
    return devs


class _ShapeOnlyDevice:
    """Stands in for a device when nothing can be compiled (the estimate only needs the mesh's shape)."""

    def __init__(self, i: int):
        self.id = i

    def __repr__(self) -> str:
        return f"ShapeOnlyDevice({self.id})"


def build_mesh(config_mesh: dict, devices: list, num_slices: int = 1):
    """The trainer's (data, fsdp, tensor) mesh over `devices`; with several slices the data axis spans them
    (only data parallelism crosses the slower data-center network)."""
    import numpy as np
    from jax.sharding import AxisType, Mesh

    from embedjax import sharding

    if num_slices == 1:
        if isinstance(devices[0], _ShapeOnlyDevice):
            dims = _resolve_dims(config_mesh, len(devices))
            return Mesh(np.asarray(devices, dtype=object).reshape(dims), sharding.MESH_AXES,
                        axis_types=(AxisType.Auto,) * 3)
        return sharding.make_mesh(dict(config_mesh), devices=devices)
    from jax.experimental import mesh_utils

    dims = _resolve_dims(config_mesh, len(devices))
    if dims[0] % num_slices:
        raise AotError(f"mesh {dict(zip(sharding.MESH_AXES, dims))}: data={dims[0]} must be a multiple of "
                       f"--num-slices {num_slices} (data parallelism spans the slices)")
    ici = (dims[0] // num_slices, dims[1], dims[2])
    arr = mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1), devices=devices)
    return Mesh(arr, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _resolve_dims(config_mesh: dict, n: int) -> list[int]:
    from embedjax import sharding

    dims = [int(config_mesh.get(a, 1)) for a in sharding.MESH_AXES]
    if -1 in dims:
        rest = math.prod(d for d in dims if d != -1)
        if n % rest:
            raise AotError(f"mesh {dict(config_mesh)} cannot be laid over {n} devices")
        dims[dims.index(-1)] = n // rest
    if math.prod(dims) != n:
        raise AotError(f"mesh {dict(config_mesh)} needs {math.prod(dims)} devices, the target has {n}")
    return dims


# --------------------------------------------------------------------------------------------- abstract state

def model_config_from(config) -> Any:
    """The ModelConfig a training run would build (`embedjax.models.source.resolve`, configurations only)."""
    from embedjax.models.source import resolve

    try:
        return resolve(config, weights=False, tokenizer=False).config
    except Exception as e:  # any failure to read the folder: say what to do instead
        if not config.init_from:
            raise
        raise AotError(f"init_from {config.init_from!r} cannot be read here ({type(e).__name__}: {e}); "
                       "give the architecture as model_config (see configs/sentence_t5.py)") from e


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def global_bytes(tree: Any) -> int:
    import jax
    import numpy as np

    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def activation_estimate(model_cfg, config, mesh) -> int:
    """Per-device bytes of the activations the backward pass keeps, analytic.

    Per token and layer: residual stream, norm outputs, q/k/v, attention context and MLP intermediates in the
    compute dtype, attention logits and probabilities in float32. With `remat_policy="full"` only each layer's
    input is kept, plus one layer's activations while it is recomputed ("dots" is counted as no remat). With
    gradient caching only one chunk's activations are live at a time."""
    import numpy as np

    from embedjax import sharding

    enc = model_cfg.encoder
    t = sharding.tensor_parallel_size(mesh)
    dp = sharding.data_parallel_size(mesh)
    b = np.dtype(getattr(enc, "dtype", "float32")).itemsize
    if model_cfg.architecture == "t5":
        D, F, H, HK, layers = enc.d_model, enc.d_ff, enc.num_heads, enc.num_heads * enc.d_kv, enc.num_layers
        mlp_tensors = 4 if enc.is_gated else 2
    elif model_cfg.architecture == "decoder":   # heads x head_dim need not equal the hidden size; GQA; gated MLP
        D, F, H, layers = enc.hidden_size, enc.intermediate_size, enc.num_attention_heads, enc.num_hidden_layers
        HK = (H + enc.num_key_value_heads) * enc.head_dim / 2   # q and context: H heads; k and v: KV heads
        mlp_tensors = 4
    else:
        D, F, H, layers = enc.hidden_size, enc.intermediate_size, enc.num_attention_heads, enc.num_hidden_layers
        HK, mlp_tensors = D, 2
    B_local = max(1, int(config.batch_size) // dp)
    chunks = int(config.grad_cache_chunks or 0)
    K = int(config.data.num_negatives)
    # (rows per example, length) of each tower input: queries, positives, hard negatives [B*K, Ld]
    towers = [(1, int(config.max_query_length)), (1, int(config.max_document_length))]
    if K:
        towers.append((K, int(config.max_document_length)))

    def tower_bytes(rows: float, L: int) -> float:
        per_token = b * (4 * D + 4 * HK / t + mlp_tensors * F / t) + 4 * 2 * (H / t) * L
        if getattr(enc, "remat", "none") == "full":
            return rows * L * (layers * b * D + per_token)
        return rows * L * layers * per_token

    if chunks > 1:  # gradient caching: one chunk of one tower is live in the backward pass at a time
        total = max(tower_bytes(B_local * r / chunks, L) for r, L in towers)
    else:
        total = sum(tower_bytes(B_local * r, L) for r, L in towers)
    return int(total)


def gathered_weights_estimate(model_cfg, abstract_model_params: Any, mesh) -> int:
    """Per-device bytes of FSDP-gathered weights live at once: two encoder layers' parameters (the one computing
    and the one being prefetched), split only by the tensor axis. 0 without FSDP."""
    from embedjax import sharding

    if sharding.param_shard_size(mesh) == 1:
        return 0
    enc = model_cfg.encoder
    layers = getattr(enc, "num_layers", None) or getattr(enc, "num_hidden_layers", 1)
    towers = 1 if model_cfg.shared_towers else 2
    return int(2 * global_bytes(abstract_model_params) / (layers * towers) / sharding.tensor_parallel_size(mesh))


# --------------------------------------------------------------------------------------------- the check

@dataclasses.dataclass
class AotReport:
    config: str
    target: str
    mesh: dict
    num_hosts: int
    num_params: int
    batch_size: int
    seq_lengths: tuple[int, int]
    method: str                          # "compiled" | "estimate"
    hbm_bytes: int | None
    estimate: dict[str, int]             # params, grads, opt_state, batch, gathered, activations, total per device
    compiled: dict[str, int] | None = None
    compile_seconds: float | None = None
    libtpu_error: str | None = None
    flops_per_device: float | None = None
    compiler_oom: str | None = None       # the compiler's RESOURCE_EXHAUSTED message (the step does not fit)
    oom_required_bytes: int | None = None  # what that message says the temporaries need

    @property
    def peak_bytes(self) -> int:
        if self.compiled:
            return self.compiled["total"]
        if self.oom_required_bytes is not None:
            return self.oom_required_bytes + self.estimate["params"] + self.estimate["opt_state"]
        return self.estimate["total"]

    @property
    def fits(self) -> bool | None:
        if self.compiler_oom:
            return False
        return None if self.hbm_bytes is None else self.peak_bytes <= self.hbm_bytes

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(peak_bytes=self.peak_bytes, fits=self.fits)
        return d


_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": GiB, "T": 1024 ** 4}


def parse_oom_bytes(message: str) -> int | None:
    """Bytes from XLA's 'memory required for HLO temporaries (201.53G) exceeds available HBM (15.75G)'."""
    m = re.search(r"required for [^(]*\(([\d.]+)([KMGT]?)\)", message)
    return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else None


def compiled_memory(compiled) -> dict[str, int]:
    """Per-device bytes from `Compiled.memory_analysis()`; total = arguments + outputs - aliased (donated) +
    temporaries + generated code."""
    ma = compiled.memory_analysis()
    if ma is None:
        raise AotError("the compiler returned no memory analysis for this backend")
    def get(k: str) -> int:
        return int(getattr(ma, k, 0) or 0)

    out = {"arguments": get("argument_size_in_bytes"), "outputs": get("output_size_in_bytes"),
           "aliased": get("alias_size_in_bytes"), "temporaries": get("temp_size_in_bytes"),
           "code": get("generated_code_size_in_bytes")}
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"] + out["code"]
    return out


def check(config, target: Target, *, config_name: str = "", estimate_only: bool = False) -> AotReport:
    """Builds the abstract state / batch for `target`, estimates memory, and (unless `estimate_only` or libtpu is
    missing) lowers and compiles the train step for it."""
    import jax

    from embedjax import sharding
    from embedjax.experiment import assemble

    model_cfg = model_config_from(config)
    libtpu_error = None
    devices = None
    if target.platform == "tpu" and not estimate_only:
        try:
            devices = target_devices(target)
        except AotError:
            raise
        except Exception as e:  # noqa: BLE001 - libtpu missing / refuses: record the exact error, fall back
            libtpu_error = f"{type(e).__name__}: {e}".strip().splitlines()[0]
            log.warning("cannot describe %s with libtpu (%s); falling back to the abstract estimate",
                        target.name, libtpu_error)
    elif target.platform == "cpu":
        devices = target_devices(target)
    compile_it = devices is not None and not estimate_only
    if devices is None:
        devices = [_ShapeOnlyDevice(i) for i in range(target.total_devices)]
    mesh = build_mesh(dict(config.mesh), devices, target.num_slices)
    dp = sharding.data_parallel_size(mesh)
    if config.batch_size % dp:
        raise AotError(f"batch_size {config.batch_size} is not divisible by the {dp} data-parallel devices of "
                       f"mesh {dict(mesh.shape)} on {target.name}")

    exp = assemble(config, mesh)                    # what the trainer assembles, on the target's mesh
    state, shards = exp.abstract_state(model_cfg)   # nothing allocated
    batch = exp.batch_spec()
    est = {"params": per_device_bytes(state.params), "opt_state": per_device_bytes(state.opt_state),
           "batch": per_device_bytes(batch), "activations": activation_estimate(model_cfg, config, mesh)}
    from embedjax.train_step import trainable
    est["grads"] = per_device_bytes(trainable(state.params))   # LoRA: the adapters' (the model is frozen)
    est["gathered"] = gathered_weights_estimate(model_cfg, state.params["model"], mesh)
    est["total"] = sum(est.values())
    if compile_it:
        hosts = len({getattr(d, "process_index", 0) for d in devices})
    else:
        hosts = max(1, target.total_devices // math.prod(target.chips_per_host_bounds)) \
            if target.platform == "tpu" else 1
    report = AotReport(config=config_name, target=target.name + (f" x{target.num_slices}" if target.num_slices > 1
                                                                 else ""),
                       mesh=dict(mesh.shape), num_hosts=hosts,
                       num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(state.params["model"])),
                       batch_size=int(config.batch_size),
                       seq_lengths=(int(config.max_query_length), int(config.max_document_length)),
                       method="estimate", hbm_bytes=target.hbm_bytes, estimate=est, libtpu_error=libtpu_error)
    if not compile_it:
        return report

    step = exp.train_step(model_cfg, shards)
    t0 = time.time()
    # never through the persistent compilation cache: compile-only (TPU topology) executables cannot be
    # serialized, and one read back from the cache need not carry the memory statistics reported here
    cache_was_on = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        with jax.set_mesh(mesh):
            lowered = step.lower(state, batch)
            compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        msg = str(e).strip().splitlines()[0]
        if "RESOURCE_EXHAUSTED" not in msg:
            raise
        report.compile_seconds = time.time() - t0
        report.method = "compiled"
        report.compiler_oom = msg
        report.oom_required_bytes = parse_oom_bytes(msg)
        return report
    finally:
        jax.config.update("jax_enable_compilation_cache", cache_was_on)
    report.compile_seconds = time.time() - t0
    report.method = "compiled"
    report.compiled = compiled_memory(compiled)
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        report.flops_per_device = float(cost.get("flops")) if cost and cost.get("flops") else None
    except Exception as e:  # noqa: BLE001 - cost analysis is optional and backend-dependent
        log.debug("no cost analysis: %s", e)
    return report


# --------------------------------------------------------------------------------------------- printing

def _gib(n: float | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / GiB:8.3f} GiB" if n >= GiB / 4 else f"{n / 1024 ** 2:8.2f} MiB"


def format_report(r: AotReport) -> str:
    lines = [f"embedjax aot: {r.config} on {r.target} ({r.num_hosts} host(s)), mesh {r.mesh}",
             (f"  model {r.num_params / 1e6:,.1f}M params; global batch {r.batch_size}, "
              f"query/doc length {r.seq_lengths[0]}/{r.seq_lengths[1]}")]
    if r.libtpu_error:
        lines.append(f"  libtpu unavailable, estimate only: {r.libtpu_error}")
    lines.append("  per device, abstract estimate (rough: no fusion temporaries or collective buffers):")
    for k in ("params", "grads", "opt_state", "batch", "gathered", "activations", "total"):
        lines.append(f"    {k:<12} {_gib(r.estimate[k])}")
    if r.compiled:
        lines.append(f"  per device, compiled for {r.target} ({r.compile_seconds:.1f}s to compile):")
        for k in ("arguments", "outputs", "aliased", "temporaries", "code", "total"):
            lines.append(f"    {k:<12} {_gib(r.compiled[k])}")
        if r.flops_per_device:
            lines.append(f"    flops/step   {r.flops_per_device / 1e9:8.1f} GFLOP per device")
    if r.method == "estimate":
        lines.append("  note: the estimate assumes activations stay sharded like the batch; only a compile (libtpu) "
                     "shows what the partitioner really does")
    if r.compiler_oom:
        lines.append(f"  the compiler ran out of memory for {r.target} ({r.compile_seconds:.1f}s): {r.compiler_oom}")
    if r.hbm_bytes is None:
        lines.append(f"  peak {_gib(r.peak_bytes).strip()} per device ({r.method}); no HBM size for this target "
                     "(pass --hbm-gib)")
    else:
        verdict = "FITS" if r.fits else "DOES NOT FIT"
        lines.append(f"  {verdict}: peak {_gib(r.peak_bytes).strip()} of {_gib(r.hbm_bytes).strip()} HBM per device "
                     f"({100 * r.peak_bytes / r.hbm_bytes:.0f}%, {r.method})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- CLI

def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "aot", help="compile the train step for a target TPU slice here and print per-device memory",
        description="Ahead-of-time check: build the train step for a target TPU topology on this machine "
                    "(libtpu compile-only devices), print per-device memory and whether it fits HBM. "
                    "Falls back to an abstract estimate when libtpu is not installed.")
    p.add_argument("--config", required=True, help="configs/NAME.py[:variant]")
    p.add_argument("--topology", required=True,
                   help="accelerator type as gcloud names it: v5e-256 (= v5litepod-256), v4-32, v5p-128, v6e-64; "
                        "or cpu-N for this machine's CPU devices")
    p.add_argument("--num-slices", type=int, default=1, help="multi-slice (DCN) training over N slices")
    p.add_argument("--hbm-gib", type=float, default=None, help="override the per-device memory to check against")
    p.add_argument("--estimate-only", action="store_true", help="skip compiling; abstract estimate only")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set batch_size=1024 --set mesh.tensor=4 (repeatable)")
    p.add_argument("--json", default=None, help="also write the report as JSON to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Prints the report; exit status 0 when it fits (or no HBM size is known), 1 when it does not."""
    target = parse_topology(args.topology, args.num_slices, args.hbm_gib)
    import jax
    from jax._src import xla_bridge  # backends_are_initialized: private, only used to avoid a hard error

    if not xla_bridge.backends_are_initialized():
        # Compile-only TPU devices need no TPU backend, and cpu-N means this machine's CPU devices.
        jax.config.update("jax_platforms", "cpu")
        if target.platform == "cpu" and "device_count" not in os.environ.get("XLA_FLAGS", ""):
            jax.config.update("jax_num_cpu_devices", target.num_devices)
    from embedjax.config import load_config

    overrides = list(args.overrides) + list(getattr(args, "config_overrides", []) or [])
    config = load_config(args.config, overrides)
    report = check(config, target, config_name=args.config, estimate_only=args.estimate_only)
    print(format_report(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report.to_json(), f, indent=2)
    return 1 if report.fits is False else 0
