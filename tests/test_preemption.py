"""Exact resume after the two ways a TPU job dies: SIGKILL in the middle of a checkpoint save, and SIGTERM
(preemption notice). Both restart and finish bitwise equal to a straight run (params and optimizer state).

The interrupted runs are real `embedjax train` processes; the signal is sent from inside them at a chosen
moment (a patched function), so the test is deterministic on a loaded machine."""
import logging
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("seqio")

from embedjax.checkpoint import Checkpointer, incomplete_checkpoints  # noqa: E402
from embedjax.config import load_config  # noqa: E402
from _processes import REPO, child_env  # noqa: E402

OVERRIDES = ["num_steps=20", "checkpoint_every_steps=2", "log_every_steps=1"]

# Dies while step 12's checkpoint is being written: its arrays are in the temporary directory, the commit
# (rename) has not happened.
KILL_DURING_SAVE = """
import os, signal, sys
from orbax.checkpoint._src.path import atomicity
orig_finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self, *a, **k):
    if self.get().name.startswith("12."):
        os.kill(os.getpid(), signal.SIGKILL)
    return await orig_finalize(self, *a, **k)
atomicity.AtomicRenameTemporaryPath.finalize = finalize
from embedjax.cli import main
sys.exit(main(sys.argv[1:]))
"""

# A real SIGTERM arrives while batch STEP is being read (as a preemption notice would, at any moment).
SIGTERM_AT = """
import os, signal, sys
from embedjax import trainer
STEP = int(os.environ["SIGTERM_AT_BATCH"])
build = trainer.build_train_iterator
class Signalling:
    def __init__(self, it):
        self.it, self.n = it, 0
    def __next__(self):
        self.n += 1
        if self.n == STEP:
            os.kill(os.getpid(), signal.SIGTERM)
        return next(self.it)
    def get_state(self):
        return self.it.get_state()
    def set_state(self, s):
        self.it.set_state(s)
trainer.build_train_iterator = lambda *a, **k: Signalling(build(*a, **k))
from embedjax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run_child(code: str, workdir, env_extra=None) -> subprocess.CompletedProcess:
    env = child_env(8)
    env.update(env_extra or {})
    args = ["train", "--config", "configs/tiny.py", "--workdir", str(workdir), "--distributed", "off",
            *[f"--config.{o}" for o in OVERRIDES]]
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.params)], \
           [np.asarray(x) for x in jax.tree.leaves(state.opt_state)]


def _assert_bitwise(a, b):
    pa, oa = _leaves(a)
    pb, ob = _leaves(b)
    assert len(pa) == len(pb) and len(oa) == len(ob)
    assert all(np.array_equal(x, y) for x, y in zip(pa, pb)), "params differ"
    assert all(np.array_equal(x, y) for x, y in zip(oa, ob)), "optimizer state differs"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    from embedjax.trainer import train_and_evaluate

    return train_and_evaluate(load_config("configs/tiny.py", OVERRIDES), tmp_path_factory.mktemp("straight"))


@pytest.mark.slow
def test_sigkill_during_save_resumes_from_last_complete_checkpoint(straight, tmp_path, caplog):
    from embedjax.trainer import train_and_evaluate

    workdir = tmp_path / "killed"
    proc = _run_child(KILL_DURING_SAVE, workdir)
    assert proc.returncode == -9, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckdir = workdir / "checkpoints"
    assert [s for s, _ in incomplete_checkpoints(ckdir)] == [12], sorted(p.name for p in ckdir.iterdir())
    ck = Checkpointer(ckdir, read_only=True)
    assert ck.latest_step() == 10
    ck.close()

    with caplog.at_level(logging.WARNING, logger="embedjax.checkpoint"):
        resumed = train_and_evaluate(load_config("configs/tiny.py", OVERRIDES), workdir)
    assert any("step 12" in r.getMessage() and "incomplete" in r.getMessage() for r in caplog.records)
    assert resumed["final_step"] == 20
    _assert_bitwise(straight["state"], resumed["state"])


@pytest.mark.slow
def test_sigterm_checkpoints_at_next_step_exits_0_and_resumes_exactly(straight, tmp_path):
    from embedjax.trainer import train_and_evaluate

    at = int(np.random.default_rng().integers(3, 18))   # a random step; the message says which
    workdir = tmp_path / "preempted"
    proc = _run_child(SIGTERM_AT, workdir, {"SIGTERM_AT_BATCH": str(at)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"SIGTERM at batch {at}:\n" + out[-4000:]
    # the signal arrived while batch `at` was read; that step completes and is checkpointed
    assert f"preempted at step {at}: checkpoint saved" in proc.stdout, out[-3000:]
    ck = Checkpointer(workdir / "checkpoints", read_only=True)
    assert ck.latest_step() == at
    ck.close()

    resumed = train_and_evaluate(load_config("configs/tiny.py", OVERRIDES), workdir)
    assert resumed["final_step"] == 20
    _assert_bitwise(straight["state"], resumed["state"])
