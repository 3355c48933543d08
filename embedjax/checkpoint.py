"""The only module that imports Orbax: a CheckpointManager for the train state plus the data iterator's state.

Resume order (logged): the workdir's latest complete checkpoint, else `init_from` (pretrained), else scratch.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax

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
        ocp = self._ocp
        args = {"state": ocp.args.StandardSave(state)}
        if data_state is not None:
            args["data"] = ocp.args.JsonSave(data_state)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict | None, int]:
        """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs with .sharding)."""
        ocp = self._ocp
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint")
        items = set(self.manager.item_metadata(step).keys()) if hasattr(self.manager, "item_metadata") else {"state"}
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if "data" in items:
            args["data"] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        return out["state"], (out["data"] if "data" in out else None), step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a live state: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
