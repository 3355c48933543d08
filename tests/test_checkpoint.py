"""Checkpointer policies and the small multi-host pieces, fast (no training)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedjax import sharding
from embedjax.checkpoint import Checkpointer, _this_process_data, abstract_like, incomplete_checkpoints


def _state():
    mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    return {"params": {"model": {"w": jax.device_put(jnp.arange(8.0), sh)}},
            "opt_state": {"mu": jax.device_put(jnp.ones(8), sh)}}


def test_keeps_last_k_plus_best_by_metric(tmp_path):
    ck = Checkpointer(tmp_path, keep=2, keep_best=1, best_metric="ndcg@10")
    s = _state()
    for step, m in [(2, {"ndcg@10": 0.7}), (4, {"ndcg@10": 0.5}), (6, None), (8, {"other": 1.0}), (10, None)]:
        ck.save(step, s, {"pos": step}, metrics=m)
    ck.close()
    ck = Checkpointer(tmp_path, read_only=True)
    assert ck.all_steps() == [2, 8, 10]     # best (step 2) + last two
    state, data, step = ck.restore(abstract_like(s))
    assert step == 10 and data == {"pos": 10}
    np.testing.assert_array_equal(np.asarray(state["params"]["model"]["w"]), np.arange(8.0))


def test_params_only_restore_reads_no_optimizer_state(tmp_path):
    ck = Checkpointer(tmp_path, async_save=False)
    ck.save(3, _state())
    ck.close()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    ck = Checkpointer(tmp_path, read_only=True)
    out, step = ck.restore_subtree({"params": {"model": {"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=one)}}})
    assert step == 3 and set(out) == {"params"}
    np.testing.assert_array_equal(np.asarray(out["params"]["model"]["w"]), np.arange(8.0))


def test_incomplete_save_is_named_and_skipped(tmp_path, caplog):
    ck = Checkpointer(tmp_path, async_save=False)
    ck.save(2, _state())
    ck.close()
    (tmp_path / "4.orbax-checkpoint-tmp-1234").mkdir()    # what a process killed mid-save leaves
    assert [s for s, _ in incomplete_checkpoints(tmp_path)] == [4]
    with caplog.at_level("WARNING", logger="embedjax.checkpoint"):
        ck = Checkpointer(tmp_path, read_only=True)
    assert ck.latest_step() == 2
    assert any("step 4" in r.getMessage() and "incomplete" in r.getMessage() for r in caplog.records)


def test_best_metric_is_required_with_keep_best(tmp_path):
    with pytest.raises(ValueError, match="best_metric"):
        Checkpointer(tmp_path, keep_best=2)


def test_data_state_across_process_counts():
    assert _this_process_data([{"a": 1}], "x") == {"a": 1}
    assert _this_process_data([{"a": 1}, {"a": 1}], "x") == {"a": 1}    # host-count invariant iterator
    with pytest.raises(ValueError, match="2 processes, restoring with 1"):
        _this_process_data([{"a": 1}, {"a": 2}], "x")


def test_padding_agreed_across_hosts(monkeypatch):
    from jax.experimental import multihost_utils

    # this host padded queries to 16 and documents to 32; the other host to 32 and 16
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda x: np.stack([x, np.asarray([16, 16, 32, 32], np.int32)]))  # sorted keys
    local = {"query_ids": np.ones((2, 16), np.int32), "query_mask": np.ones((2, 16), np.int32),
             "positive_ids": np.ones((2, 32), np.int32), "positive_mask": np.ones((2, 32), np.int32)}
    out = sharding.agree_padding(local)
    assert out["query_ids"].shape == (2, 32) and out["positive_ids"].shape == (2, 32)
    assert out["query_mask"][:, 16:].sum() == 0 and out["query_mask"][:, :16].all()


def test_host_rows_slices_the_global_batch():
    from embedjax.data.tasks import HostRows

    class Global:
        def __next__(self):
            return {"x": np.arange(8)[:, None] * np.ones((1, 3), int)}

        def get_state(self):
            return {"s": 1}

    rows = [next(HostRows(Global(), i, 2))["x"][:, 0].tolist() for i in range(2)]
    assert rows == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert HostRows(Global(), 0, 2).get_state() == {"s": 1}


def test_cluster_detection_from_environment():
    from embedjax.cli import cluster_detected

    assert not cluster_detected({})
    assert cluster_detected({"TPU_WORKER_HOSTNAMES": "a,b"})
    assert cluster_detected({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"})
    assert cluster_detected({"SLURM_NTASKS": "4"}) and not cluster_detected({"SLURM_NTASKS": "1"})
    assert cluster_detected({"OMPI_COMM_WORLD_SIZE": "2"})


def test_config_checks_checkpoint_and_host_order_settings():
    from embedjax.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="keep_best_checkpoints needs best_metric"):
        load_config("configs/tiny.py", ["keep_best_checkpoints=2"])
    with pytest.raises(ConfigError, match="data.host_order"):
        load_config("configs/tiny.py", ["data.host_order=sometimes"])
    cfg = load_config("configs/tiny.py", ["keep_best_checkpoints=2", "best_metric=beir/scifact/test/ndcg@10"])
    assert cfg.best_mode == "max"


def test_missing_step_and_bad_init_from_are_one_line_errors(tmp_path):
    from embedjax.models.source import run_reference

    ck = Checkpointer(tmp_path / "checkpoints", async_save=False)
    ck.save(2, _state())
    ck.close()
    (tmp_path / "config.json").write_text("{}")
    ck = Checkpointer(tmp_path / "checkpoints", read_only=True)
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint at step 7 \(complete steps: 2\)"):
        ck.restore(abstract_like(_state()), step=7)
    with pytest.raises(ValueError, match="the part after @ must be a step number"):
        run_reference(f"{tmp_path}@latest")
    assert run_reference(f"{tmp_path}@2")[1] == 2
