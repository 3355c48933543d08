"""Restore onto another mesh: a checkpoint written on 8 devices as (data 4, fsdp 2, tensor 1) restores on
(2, 2, 2) and on 4 devices (2, 2, 1), each array shard read straight onto the devices its new sharding names,
and training continues with the same loss at the next step as without the move."""
import json
import shutil

import jax
import pytest

pytest.importorskip("seqio")

from embedjax.config import load_config  # noqa: E402

BASE = ["num_steps=5", "checkpoint_every_steps=4", "log_every_steps=1", "mesh.data=4", "mesh.fsdp=2",
        "mesh.tensor=1"]


def _train_losses(workdir) -> dict[int, float]:
    recs = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in recs if "train/loss" in r}


@pytest.mark.slow
@pytest.mark.parametrize("mesh,n_devices", [((2, 2, 2), 8), ((2, 2, 1), 4)], ids=["2x2x2", "4-devices"])
def test_checkpoint_restores_onto_another_mesh(tmp_path_factory, mesh, n_devices):
    from embedjax.trainer import train_and_evaluate

    base = tmp_path_factory.getbasetemp() / "reshard_base"
    if not (base / "checkpoints" / "4").exists():   # shared by both cases
        train_and_evaluate(load_config("configs/tiny.py", BASE), base)
    expected = _train_losses(base)[5]

    workdir = tmp_path_factory.mktemp("moved")
    shutil.copytree(base / "checkpoints", workdir / "checkpoints")
    shutil.rmtree(workdir / "checkpoints" / "5")
    overrides = BASE + [f"mesh.data={mesh[0]}", f"mesh.fsdp={mesh[1]}", f"mesh.tensor={mesh[2]}"]
    res = train_and_evaluate(load_config("configs/tiny.py", overrides), workdir,
                             devices=jax.devices()[:n_devices])
    assert sorted(_train_losses(workdir)) == [5]   # resumed at step 4, trained step 5 only
    # Same data and weights on another mesh: only the order of float32 reductions (gradient all-reduce, the
    # loss's sums over the global batch) changes, a few ulps of a loss of ~2.5, so the bound is relative to the
    # loss (rtol 4e-6 ~ 32 ulps), not an absolute number that a larger loss would outgrow.
    assert _train_losses(workdir)[5] == pytest.approx(expected, rel=4e-6, abs=0)

    # the restored state lives on the new mesh, sharded as its rules say (not gathered anywhere)
    params = res["state"].params["model"]["tower"]["encoder"]
    kernel = params["layer_0"]["intermediate"]["kernel"]     # logical (embed, mlp) -> (fsdp, tensor)
    assert kernel.sharding.mesh.devices.size == n_devices
    assert dict(kernel.sharding.mesh.shape) == {"data": mesh[0], "fsdp": mesh[1], "tensor": mesh[2]}
    shard = kernel.addressable_shards[0].data.shape
    assert shard == (kernel.shape[0] // mesh[1], kernel.shape[1] // mesh[2])
