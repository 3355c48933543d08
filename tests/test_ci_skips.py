"""A dependency missing from the environment must fail CI, not hide as a skip (tests/conftest.py). Shown for
seqio: with `import seqio` made to fail (a shadowing package on PYTHONPATH, as if it were not installed),
collecting tests/test_train.py (which needs seqio) with tests/test_losses.py skips the first module; under CI=true the run then fails and names
the skip, without CI it passes with the skip."""
import os
import subprocess
import sys

from _processes import REPO


def _collect(tmp_path, ci: bool) -> subprocess.CompletedProcess:
    blocker = tmp_path / "blocked" / "seqio"
    blocker.mkdir(parents=True, exist_ok=True)
    (blocker / "__init__.py").write_text('raise ModuleNotFoundError("No module named seqio (blocked by the test)", name="seqio")\n')
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join([str(blocker.parent), env.get("PYTHONPATH", "")])
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           str(REPO / "tests" / "test_train.py"), str(REPO / "tests" / "test_losses.py")],
                          cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_missing_dependency_fails_ci_and_only_skips_locally(tmp_path):
    r = _collect(tmp_path, ci=True)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out           # TESTS_FAILED: the other file's tests were collected fine
    assert "skips fail under CI" in out and "test_train.py" in out and "seqio" in out, out
    local = _collect(tmp_path, ci=False)
    assert local.returncode == 0, local.stdout + local.stderr
    assert "skips fail under CI" not in local.stdout
