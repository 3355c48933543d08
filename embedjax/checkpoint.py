"""The only module that imports Orbax: a CheckpointManager for the train state plus the data iterator's state.

- Save decisions: every `save_every` steps (the trainer decides), at preemption, at the end.
- Preservation: the last `keep` checkpoints, plus the `keep_best` best by an eval metric (`best_metric`).
- Saves are asynchronous (the next steps run while the arrays are written) and atomic: Orbax writes a step into
  ``<step>.orbax-checkpoint-tmp-*`` and renames it when complete (on GCS: ``commit_success.txt``), so a process
  killed mid-save leaves an incomplete entry that is never restored; `Checkpointer` warns about it by name.
- Restore reads each array shard onto the devices that the target shardings name, so a checkpoint written on
  one mesh restores onto another (other device count, other (data, fsdp, tensor) split) without gathering the
  full state on one host.
- Paths may be local or ``gs://`` (etils.epath).

Resume order (the trainer logs it): the workdir's latest complete checkpoint, else `init_from` (pretrained),
else scratch.
"""
from __future__ import annotations

import json
import logging
import re
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)

_TMP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


def as_path(p: Any):
    """An etils.epath.Path: local paths and gs:// alike (gs:// through gcsfs: see embedjax/__init__.py)."""
    from etils import epath

    if str(p).startswith("gs://"):
        _require_gcs_client()
    return epath.Path(p)


def _require_gcs_client() -> None:
    import importlib.util
    import os

    from embedjax.errors import EmbedjaxError

    uses_tf = os.environ.get("EPATH_USE_TF", "").lower() not in ("false", "no", "f", "0")
    if uses_tf and importlib.util.find_spec("tensorflow") is not None:
        return   # the user asked for tf.io.gfile
    if importlib.util.find_spec("gcsfs") is None:
        raise EmbedjaxError("gs:// paths need gcsfs (etils.epath's client for Google Cloud Storage): "
                            "pip install 'embedjax[gcs]'")


def incomplete_checkpoints(directory: Any) -> list[tuple[int, Any]]:
    """(step, path) of saves that were cut off (process killed mid-save): temporary step directories, and on
    object stores (no atomic rename) step directories without Orbax's ``commit_success.txt``."""
    directory = as_path(directory)
    if not directory.exists():
        return []
    out = []
    remote = "://" in str(directory)
    for p in directory.iterdir():
        m = _TMP.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
        elif remote and p.name.isdigit() and p.is_dir() and not (p / "commit_success.txt").exists():
            out.append((int(p.name), p))
    return sorted(out, key=lambda t: t[0])


class Checkpointer:
    """Orbax CheckpointManager for {"state": train state, "data": every process's data-iterator state}."""

    def __init__(self, directory: Any, *, keep: int = 3, keep_best: int = 0, best_metric: str = "",
                 best_mode: str = "max", async_save: bool = True, read_only: bool = False):
        import orbax.checkpoint as ocp
        from orbax.checkpoint import checkpoint_managers as cm

        if keep_best and not best_metric:
            raise ValueError("keep_best needs best_metric (an eval metric name, e.g. 'beir/scifact/test/ndcg@10')")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self._ocp = ocp
        path = str(directory)
        self.directory = as_path(path if "://" in path else as_path(path).absolute())
        self.skipped = incomplete_checkpoints(self.directory)
        for step, p in self.skipped:
            log.warning("checkpoint step %d at %s is incomplete (its save was cut off); it is skipped", step, p)
        policies = [cm.LatestN(n=keep or None)]
        if keep_best:
            policies.append(cm.BestN(get_metric_fn=lambda m: float(m[best_metric]), reverse=best_mode == "min",
                                     n=keep_best, keep_checkpoints_without_metrics=False))
        opts = ocp.CheckpointManagerOptions(
            create=not read_only, read_only=read_only, enable_async_checkpointing=async_save,
            preservation_policy=cm.AnyPreservationPolicy(policies) if len(policies) > 1 else policies[0])
        self.best_metric = best_metric
        self._warned_metric = False
        self.manager = ocp.CheckpointManager(self.directory, options=opts)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict | None = None, *, metrics: dict | None = None,
             force: bool = True) -> bool:
        """Starts an asynchronous save of the train state and every process's data-iterator state (gathered;
        a collective, so every process calls it). `metrics` (eval results) rank checkpoints for `keep_best`."""
        ocp = self._ocp
        args = {"state": ocp.args.StandardSave(state)}
        if data_state is not None:
            args["data"] = ocp.args.JsonSave({"per_process": allgather_json(data_state)})
        if metrics is not None and self.best_metric and self.best_metric not in metrics:
            if not self._warned_metric:
                log.warning("best_metric %r is not among the evaluation's metrics (%s): checkpoints are not "
                            "ranked", self.best_metric, ", ".join(sorted(metrics)))
                self._warned_metric = True
            metrics = None   # an evaluation without the ranking metric does not rank
        return self.manager.save(step, args=ocp.args.Composite(**args), metrics=metrics, force=force)

    def restore(self, abstract_state: Any, step: int | None = None, *, with_data: bool = True
                ) -> tuple[Any, dict | None, int]:
        """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs with .sharding), on any
        mesh. `with_data=False` skips the data-iterator state (export, evaluation)."""
        ocp = self._ocp
        step = self._pick(step)
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if with_data and (self.directory / str(step) / "data").exists():
            args["data"] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        data = None
        if with_data and "data" in out and out["data"] is not None:
            data = _this_process_data(out["data"]["per_process"], f"{self.directory} step {step}")
        return out["state"], data, step

    def restore_subtree(self, abstract_subtree: Any, step: int | None = None) -> tuple[Any, int]:
        """Restores only the leaves named by `abstract_subtree` (e.g. {"params": {"model": ...}}, no optimizer
        state): the other arrays of the checkpoint are not read."""
        ocp = self._ocp
        step = self._pick(step)
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                                                   dtype=a.dtype), abstract_subtree)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=abstract_subtree, restore_args=restore_args, partial_restore=True)))
        return out["state"], step

    def _pick(self, step: int | None) -> int:
        """`step`, or the latest; a clear error when there is no such complete checkpoint."""
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"{self.directory}: no checkpoint")
        if step is None:
            return max(steps)
        if step not in steps:
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint at step {step} "
                                    f"(complete steps: {', '.join(map(str, sorted(steps)))})")
        return step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _this_process_data(per_process: list, where: str) -> dict | None:
    """This process's entry; a host-count-invariant iterator (same state on every process) resumes on any
    number of processes."""
    if len(per_process) == jax.process_count():
        return per_process[jax.process_index()]
    if all(p == per_process[0] for p in per_process):
        return per_process[0]
    raise ValueError(f"{where}: data state saved by {len(per_process)} processes, restoring with "
                     f"{jax.process_count()}; a per-host data order cannot be resumed exactly on another host "
                     "count (use data.host_order='global', or restore without the data state)")


def allgather_json(obj: Any) -> list[Any]:
    """Every process's JSON-able `obj`, in process order (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int32))).reshape(-1)
    buf = np.zeros(int(lengths.max()), np.uint8)
    buf[: raw.size] = raw
    allbuf = np.asarray(multihost_utils.process_allgather(buf))
    return [json.loads(bytes(allbuf[i, : lengths[i]]).decode()) for i in range(len(lengths))]


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a live state: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
