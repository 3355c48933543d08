"""Checkpoint + resume: a run stopped at step 6 and restarted finishes bitwise equal to a straight run
(train state and data order both restored)."""
import jax
import numpy as np
import pytest

pytest.importorskip("seqio")

from embedjax.config import load_config  # noqa: E402


def _params(res):
    return [np.asarray(x) for x in jax.tree.leaves(res["state"].params)], \
           [np.asarray(x) for x in jax.tree.leaves(res["state"].opt_state)]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["scan_layers=True", "param_dtype=bfloat16", "dtype=bfloat16"]],
                         ids=["float32", "scanned-bfloat16"])
def test_stop_and_resume_is_bitwise_equal(tmp_path, extra):
    from embedjax.trainer import train_and_evaluate

    overrides = ["num_steps=10", "checkpoint_every_steps=4", "log_every_steps=1", *extra]
    straight = train_and_evaluate(load_config("configs/tiny.py", overrides), tmp_path / "straight")

    calls = {"n": 0}

    def stop_at_6():
        calls["n"] += 1
        return calls["n"] == 6

    first = train_and_evaluate(load_config("configs/tiny.py", overrides), tmp_path / "resumed",
                               stop_requested=stop_at_6)
    assert first["final_step"] == 6
    second = train_and_evaluate(load_config("configs/tiny.py", overrides), tmp_path / "resumed")
    assert second["final_step"] == 10
    p1, o1 = _params(straight)
    p2, o2 = _params(second)
    assert all(np.array_equal(a, b) for a, b in zip(p1, p2))
    assert all(np.array_equal(a, b) for a, b in zip(o1, o2))
    if extra:   # the checkpoint kept the scanned layout and bfloat16 parameters
        model = second["state"].params["model"]
        assert "layers" in next(iter(model.values()))["encoder"]
        assert {str(x.dtype) for x in jax.tree.leaves(model)} == {"bfloat16"}


@pytest.mark.slow
def test_init_from_another_runs_checkpoint(tmp_path):
    """`init_from=WORKDIR[@STEP]`: another run's model weights (read onto this run's mesh), fresh optimizer."""
    from embedjax.checkpoint import Checkpointer
    from embedjax.trainer import train_and_evaluate

    first = train_and_evaluate(load_config("configs/tiny.py", ["num_steps=4", "checkpoint_every_steps=2"]),
                               tmp_path / "first")
    p_first, _ = _params(first)

    # latest checkpoint, on another mesh (data 4 x fsdp 2 instead of data 8); num_steps=0 keeps the start state
    second = train_and_evaluate(load_config("configs/tiny.py", [f"init_from={tmp_path / 'first'}", "num_steps=0",
                                                                "mesh.data=4", "mesh.fsdp=2"]), tmp_path / "second")
    p_second, o_second = _params(second)
    assert all(np.array_equal(a, b) for a, b in zip(p_first, p_second))
    assert int(second["state"].step) == 0 and all(not np.any(x) for x in o_second if x.dtype.kind == "f")

    # an explicit step
    at2 = train_and_evaluate(load_config("configs/tiny.py", [f"init_from={tmp_path / 'first'}@2", "num_steps=0"]),
                             tmp_path / "third")
    ck = Checkpointer(tmp_path / "first" / "checkpoints", read_only=True)
    from embedjax.checkpoint import abstract_like
    want, _, _ = ck.restore(abstract_like(first["state"]), step=2, with_data=False)
    ck.close()
    for a, b in zip(jax.tree.leaves(want.params["model"]), jax.tree.leaves(at2["state"].params["model"])):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_keeps_the_best_checkpoint_by_eval_metric(tmp_path):
    from embedjax.checkpoint import Checkpointer
    from embedjax.trainer import train_and_evaluate

    metric = "stsb/stsb/test/spearman"
    res = train_and_evaluate(load_config("configs/tiny.py", [
        "num_steps=6", "eval.every_steps=2", "eval.before=False", "keep_checkpoints=1", "keep_best_checkpoints=1",
        f"best_metric={metric}", "eval.tasks=('stsb:embedjax/data/shipped/stsb:test',)"]), tmp_path)
    scores = {s: m[metric] for s, m in res["during"].items()} | {6: res["after"][metric]}
    assert sorted(scores) == [2, 4, 6]
    best = max(scores, key=scores.get)
    ck = Checkpointer(tmp_path / "checkpoints", read_only=True)
    assert sorted(ck.all_steps()) == sorted({best, 6})     # the best by the metric + the latest
    ck.close()
