"""bench/_harness.py flags a run by the CPU other processes used while it ran, not by its own work."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import _harness  # noqa: E402


def _spin(seconds: float) -> None:
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        pass


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="CpuWatch reads /proc/stat (Linux)")
def test_own_work_is_not_load_and_another_process_is(tmp_path, monkeypatch):
    monkeypatch.setattr(_harness, "RESULTS", tmp_path / "results.jsonl")
    # the benchmark's own busy loop and a waited-for child's are this process tree's: not flagged
    quiet = _harness.compare("own", {"a": lambda: _spin(0.2),
                                     "b": lambda: subprocess.run([sys.executable, "-c", "import time\nt=time.time()\n"
                                                                  "while time.time()-t<0.3: pass"], check=True)},
                             work=1, unit="x/s", rounds=2)
    assert quiet["other_cpu"] is not None and quiet["other_cpu"] < 0.25, quiet["other_cpu"]
    # a process that is not ours spinning one core of the machine's: counted
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = _harness.compare("other", {"a": lambda: time.sleep(0.5), "b": lambda: time.sleep(0.5)},
                                work=1, unit="x/s", rounds=2)
    finally:
        hog.kill()
        hog.wait()
    cores = _harness.os.cpu_count()
    assert busy["other_cpu"] > 0.6 / cores and busy["under_load"], busy["other_cpu"]
    assert "other processes" in _harness.report(busy) and "UNDER LOAD" in _harness.report(busy)
    assert (tmp_path / "results.jsonl").read_text().count("\n") == 2
