"""The only module that imports Orbax: a CheckpointManager for the train state plus the data iterator's state.

Resume order (logged): the workdir's latest complete checkpoint, else `init_from` (pretrained), else scratch.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 3, save_every: int = 0, async_save: bool = True):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(directory).absolute()
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep or None, create=True,
                                            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=opts)
        self.save_every = save_every

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict | None = None, *, force: bool = False) -> bool:
        """Saves the train state and every process's data-iterator state (gathered, stored by process 0)."""
        ocp = self._ocp
        args = {"state": ocp.args.StandardSave(state)}
        if data_state is not None:
            args["data"] = ocp.args.JsonSave({"per_process": allgather_json(data_state)})
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, abstract_state: Any, step: int | None = None, *, with_data: bool = True
                ) -> tuple[Any, dict | None, int]:
        """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs with .sharding).
        `with_data=False` skips the data-iterator state (export, evaluation, another process count)."""
        ocp = self._ocp
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint")
        items = set(self.manager.item_metadata(step).keys()) if hasattr(self.manager, "item_metadata") else {"state"}
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if "data" in items and with_data:
            args["data"] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        data = None
        if "data" in out and out["data"] is not None:
            per = out["data"]["per_process"]
            if len(per) != jax.process_count():
                raise ValueError(f"{self.directory} step {step}: data state saved by {len(per)} processes, "
                                 f"restoring with {jax.process_count()}; the data order cannot be resumed exactly")
            data = per[jax.process_index()]
        return out["state"], data, step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


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
