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
def test_stop_and_resume_is_bitwise_equal(tmp_path):
    from embedjax.trainer import train_and_evaluate

    overrides = ["num_steps=10", "checkpoint_every_steps=4", "log_every_steps=1"]
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
