"""Training on streamed data (`data.kind` files / seqio): a two-task mixture with per-task instructions, one task
per batch and false-negative masks, killed with SIGKILL mid-epoch and rerun; a registered seqio Mixture named
in the config, stopped and resumed."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from _mixture import GECKO, INSTR, scifact_rows, write_sources
from _processes import REPO, child_env

SHIPPED = REPO / "embedjax" / "data" / "shipped"

# Writes (iterator step, digest of every array of the batch) per batch; SIGKILLs itself when asked.
DIGESTS = """
import hashlib, os, signal, sys
from embedjax import trainer
OUT, KILL_AT = os.environ["DIGESTS"], int(os.environ.get("KILL_AT", "-1"))
build = trainer.build_train_iterator
class Digesting:
    def __init__(self, it):
        self.it = it
    @property
    def task_names(self):
        return self.it.task_names
    def __next__(self):
        step = self.it.get_state()["step"]
        if step == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        batch = next(self.it)
        h = hashlib.sha256()
        for k in sorted(batch):
            h.update(k.encode() + batch[k].tobytes())
        with open(OUT, "a") as f:
            f.write(f"{step} {h.hexdigest()}\\n")
            f.flush()
            os.fsync(f.fileno())
        return batch
    def get_state(self):
        return self.it.get_state()
    def set_state(self, s):
        self.it.set_state(s)
trainer.build_train_iterator = lambda *a, **k: Digesting(build(*a, **k))
from embedjax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def mixture_config(tmp_path, shipped, **extra) -> str:
    """A config file: configs/tiny.py trained on the two-task SciFact mixture as JSONL shards."""
    srcs = write_sources(tmp_path / "in", scifact_rows(shipped))
    for s, rate in zip(srcs, (2.0, 1.0)):
        s["rate"] = rate
    body = f"""
    from embedjax.config import load_config

    def get_config(arg=None):
        c = load_config({str(REPO / 'configs' / 'tiny.py')!r})
        c.data.kind = "files"
        c.data.path = ""
        c.data.sources = {srcs!r}
        c.data.query_prompt, c.data.document_prompt = {GECKO!r}
        c.data.instruction = "search result"
        c.data.num_negatives = 1
        c.data.rows_per_shard = 40
        c.loss.mask_false_negatives = True
        c.loss.same_tower = True
        for k, v in {extra!r}.items():
            c[k] = v
        return c
    """
    path = tmp_path / "mixture_config.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def _train(config, workdir, digests, kill_at=-1, steps=12):
    # one device: what is tested is the data order (the mesh is tested elsewhere), and it compiles fastest
    env = child_env(1)
    env.update(DIGESTS=str(digests), KILL_AT=str(kill_at))
    return subprocess.run([sys.executable, "-c", DIGESTS, "train", "--config", config, "--workdir", str(workdir),
                           "--distributed", "off", f"--config.num_steps={steps}", "--config.checkpoint_every_steps=3",
                           "--config.log_every_steps=1", "--config.mesh.data=1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _digests(path):
    return [tuple(line.split()) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_gives_the_straight_runs_batches(tmp_path):
    config = mixture_config(tmp_path, SHIPPED)
    straight = _train(config, tmp_path / "straight", tmp_path / "straight.txt")
    assert straight.returncode == 0, straight.stderr[-3000:]
    # the log names each batch's task and the masked false negatives
    assert "task fact" in straight.stderr and "task title" in straight.stderr
    assert "masked false negatives" in straight.stderr
    manifest = json.loads((tmp_path / "straight" / "prepared" / "manifest.json").read_text())
    assert set(manifest["tasks"]) == {"fact", "title"} and len(manifest["shards"]) == 8 + 4

    killed = _train(config, tmp_path / "run", tmp_path / "killed.txt", kill_at=8)
    shard = tmp_path / "run" / "prepared" / manifest["shards"][0]["path"]
    mtime = shard.stat().st_mtime_ns
    assert killed.returncode == -9
    rerun = _train(config, tmp_path / "run", tmp_path / "rerun.txt")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    want, got = _digests(tmp_path / "straight.txt"), _digests(tmp_path / "rerun.txt")
    start = int(got[0][0])
    assert start in (3, 6)                       # resumed from a checkpoint, mid-epoch of both tasks
    assert got == want[start:]
    assert shard.stat().st_mtime_ns == mtime     # the rerun read the prepared shards, it did not rewrite them
    # the same losses at the same steps, to the bit
    loss = {}
    for name in ("straight", "run"):
        for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines():
            m = json.loads(line)
            if "train/loss" in m:
                loss.setdefault(name, {})[m["step"]] = m["train/loss"]
    assert loss["run"][12] == loss["straight"][12]


SEQIO_MODULE = '''
"""Registers two text tasks and a mixture, as a user's module would."""
import json
import seqio
import tensorflow as tf
from embedjax.data.inputs import text_features

ROWS = json.loads(open({rows!r}).read())

def source(task):
    def fn(split, shuffle_files, seed=None):
        rows = ROWS[task]
        return tf.data.Dataset.from_tensor_slices({{"query": [r["query"] for r in rows],
                                                   "positive": [r["positive"] for r in rows]}})
    return seqio.FunctionDataSource(fn, splits=["train"], num_input_examples={{"train": len(ROWS[task])}})

for task in ("claims", "titles"):
    seqio.TaskRegistry.add(task, source=source(task), preprocessors=[],
                           output_features=text_features(negatives=False))
seqio.MixtureRegistry.add("user_mix", [("claims", 2.0), ("titles", 1.0)])
'''


@pytest.mark.slow
def test_a_seqio_mixture_named_in_the_config_trains_and_resumes(tmp_path, monkeypatch):
    import jax

    from embedjax.config import load_config
    from embedjax.trainer import train_and_evaluate

    rows = scifact_rows(SHIPPED, 120)
    plain = {"claims": [{"query": r["query"], "positive": r["positive"]["text"]} for r in rows["fact"]],
             "titles": [{"query": r["q"], "positive": r["doc"]} for r in rows["title"]]}
    (tmp_path / "rows.json").write_text(json.dumps(plain))
    (tmp_path / "user_tasks.py").write_text(SEQIO_MODULE.format(rows=str(tmp_path / "rows.json")))
    monkeypatch.syspath_prepend(str(tmp_path))
    overrides = ["data.kind=seqio", "data.path=", "data.mixture=user_mix", "data.module=user_tasks",
                 "data.num_shards=4", "num_steps=6", "checkpoint_every_steps=3", "log_every_steps=1", "mesh.data=1",
                 "batch_size=8", "max_query_length=16", "max_document_length=32",
                 "data.query_prompt=Instruct: {task}\nQuery: {text}",
                 f"data.instructions={{'claims': {INSTR['fact']!r}, 'titles': {INSTR['title']!r}}}",
                 "data.instruction=Given a query, retrieve relevant passages"]
    calls = {"n": 0}

    def stop_at_3():
        calls["n"] += 1
        return calls["n"] == 3

    one = jax.devices()[:1]
    first = train_and_evaluate(load_config("configs/tiny.py", overrides), tmp_path / "run", stop_requested=stop_at_3,
                               devices=one)
    assert first["final_step"] == 3
    manifest = json.loads((tmp_path / "run" / "prepared" / "manifest.json").read_text())
    assert manifest["rates"] == {"claims": 2.0, "titles": 1.0}
    assert {t: i["shards"] for t, i in manifest["tasks"].items()} == {"claims": 4, "titles": 4}
    assert manifest["tasks"]["claims"]["instruction"] == INSTR["fact"]
    second = train_and_evaluate(load_config("configs/tiny.py", overrides), tmp_path / "run", devices=one)
    assert second["final_step"] == 6
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == [1, 2, 3, 4, 5, 6]          # the second run continued at step 4
