"""Test harness: N local processes that form one JAX job (jax.distributed on 127.0.0.1, CPU devices, gloo
collectives), each running `embedjax train` (or a Python snippet). A TPU pod runs the same code with one
process per host."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


@dataclass
class Proc:
    index: int
    popen: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_train(n: int, workdir: Path, config: str, overrides: list[str], *, devices_per_process: int,
                logdir: Path, extra_args: list[str] = ()) -> list[Proc]:
    """Starts `embedjax train` as processes 0..n-1 of one job; returns without waiting."""
    port = free_port()
    logdir.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(n):
        cmd = [sys.executable, "-m", "embedjax.cli", "train", "--config", config, "--workdir", str(workdir),
               *(["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(i)]
                 if n > 1 else ["--distributed", "off"]),
               *extra_args, *[f"--config.{o}" for o in overrides]]
        log = logdir / f"process{i}.log"
        f = open(log, "w")  # noqa: SIM115 - closed with the process
        procs.append(Proc(i, subprocess.Popen(cmd, cwd=REPO, env=child_env(devices_per_process), stdout=f,
                                              stderr=subprocess.STDOUT), log))
    return procs


def wait_all(procs: list[Proc], timeout: float) -> list[int]:
    """Exit codes; kills every process and fails with their logs when `timeout` passes."""
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.popen.wait(timeout=max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.popen.kill()
            raise AssertionError(f"processes still running after {timeout}s:\n" + logs(procs)) from None
    return codes


def logs(procs: list[Proc], tail: int = 4000) -> str:
    return "\n".join(f"--- process {p.index} ---\n{p.output()[-tail:]}" for p in procs)


def start_python(n: int, code: str, *, devices_per_process: int, logdir: Path, args: list[str] = ()) -> list[Proc]:
    """Runs `code` as processes 0..n-1 of one job: `jax.distributed.initialize` on 127.0.0.1 is called first
    (`PROCESS_ID` and `NUM_PROCESSES` are defined for the code); `args` are its sys.argv[1:]."""
    port = free_port()
    logdir.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(n):
        prologue = ("import jax\n"
                    f"jax.distributed.initialize(coordinator_address='127.0.0.1:{port}', num_processes={n}, "
                    f"process_id={i})\nPROCESS_ID, NUM_PROCESSES = {i}, {n}\n")
        log = logdir / f"process{i}.log"
        f = open(log, "w")  # noqa: SIM115 - closed with the process
        procs.append(Proc(i, subprocess.Popen([sys.executable, "-c", prologue + code, *args], cwd=REPO,
                                              env=child_env(devices_per_process), stdout=f,
                                              stderr=subprocess.STDOUT), log))
    return procs
