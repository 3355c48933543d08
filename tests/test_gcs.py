"""gs:// for real: files, and a training workdir (checkpoints, metrics, config, final model), on a local GCS
emulator (the `gcs_bucket` / `gcs_path` fixtures of tests/_gcs.py: fake-gcs-server), reached through the same clients as real GCS (gcsfs via etils.epath,
tensorstore for Orbax's arrays); the emulator's own JSON API is asked what landed in the bucket."""
import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from embedjax.data import records

REPO = Path(__file__).resolve().parents[1]


def _object_names(prefix: str) -> list[str]:
    """The object names under gs://BUCKET/prefix, from the emulator's JSON API (not through the clients tested)."""
    bucket, _, key = prefix.removeprefix("gs://").partition("/")
    url = (f"{os.environ['STORAGE_EMULATOR_HOST']}/storage/v1/b/{bucket}/o?"
           + urllib.parse.urlencode({"prefix": key + "/"}))
    with urllib.request.urlopen(url, timeout=10) as r:
        return sorted(o["name"].removeprefix(key + "/") for o in json.loads(r.read()).get("items", []))


def test_epath_round_trip(gcs_path):
    """What the library and the data layer do with gs:// paths: write, read (text, bytes, open('rb')), exists,
    is_dir, iterdir, glob; in this process and in a fresh one (environment inherited, `import embedjax` alone)."""
    shards = gcs_path / "data"
    shards.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        (shards / f"train-{i:05d}.jsonl").write_text(json.dumps({"query": f"q{i}", "positive": f"d{i}"}) + "\n")
    (shards / "manifest.bin").write_bytes(bytes(range(256)))
    assert _object_names(str(gcs_path)) == ["data/manifest.bin", "data/train-00000.jsonl", "data/train-00001.jsonl",
                                            "data/train-00002.jsonl"]
    assert gcs_path.is_dir() and shards.exists() and not (shards / "nope.jsonl").exists()
    assert sorted(p.name for p in shards.glob("train-*.jsonl")) == [f"train-{i:05d}.jsonl" for i in range(3)]
    assert sorted(p.name for p in gcs_path.iterdir()) == ["data"]
    with (shards / "manifest.bin").open("rb") as f:
        assert f.read(4) == b"\x00\x01\x02\x03" and f.seek(250) == 250 and f.read() == bytes(range(250, 256))
    assert json.loads((shards / "train-00001.jsonl").read_text())["query"] == "q1"

    code = ("import sys, embedjax; from etils import epath; "
            "print(sorted(p.name for p in epath.Path(sys.argv[1]).glob('*.jsonl')))")
    out = subprocess.run([sys.executable, "-c", code, str(shards)], check=False, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-2] == str([f"train-{i:05d}.jsonl" for i in range(3)])


def test_training_workdir_on_gcs_stops_and_resumes(gcs_path, caplog):
    """A tiny run with its workdir on the emulator and its training data (JSONL shards of a two-task mixture)
    in the bucket too, stopped after step 1 (checkpointed there), then run again: it resumes from the
    checkpoint in the bucket and finishes; checkpoints/ (Orbax through tensorstore), metrics.jsonl,
    config.json, tensorboard/, final/ and the prepared shards are in the bucket."""
    pytest.importorskip("seqio")
    import jax
    from etils import epath

    from embedjax.checkpoint import Checkpointer
    from embedjax.config import load_config, read_workdir_config
    from embedjax.trainer import train_and_evaluate

    workdir = str(gcs_path / "run")
    # the training data: JSONL shards of a two-task mixture in the bucket too (prepared into the workdir)
    from _mixture import scifact_rows
    rows = scifact_rows(REPO / "embedjax" / "data" / "shipped", 32)
    sources = []
    for task, rs in rows.items():
        for k in range(2):
            records.write_jsonl(gcs_path / "data" / task / f"part-{k}.jsonl", rs[k::2])
        sources.append({"name": task, "files": str(gcs_path / "data" / task / "part-*.jsonl"),
                        "fields": {} if task == "fact" else {"query": "q", "positive": "doc"}})
    # one device, short sequences: the least to compile (what is tested is where the files go)
    overrides = ["num_steps=2", "log_every_steps=1", "export_final=True", "mesh.data=1", "batch_size=4",
                 "max_query_length=16", "max_document_length=32", "data.kind=files", "data.path=",
                 f"data.sources={sources!r}"]
    one = jax.devices()[:1]
    first = train_and_evaluate(load_config("configs/tiny.py", overrides), workdir, stop_requested=lambda: True,
                               devices=one)
    assert first["final_step"] == 1 and first.get("preempted") is not None
    # Orbax's completion marker on GCS (no atomic rename there), written through the emulator
    assert "1/commit_success.txt" in _object_names(workdir + "/checkpoints")

    caplog.clear()
    with caplog.at_level("INFO", logger="embedjax.trainer"):
        second = train_and_evaluate(load_config("configs/tiny.py", overrides), workdir, devices=one)
    assert f"resuming from {workdir}/checkpoints step 1" in caplog.text
    assert second["final_step"] == 2

    wd = epath.Path(workdir)
    names = _object_names(workdir)
    for want in ("config.json", "metrics.jsonl", "final/model.safetensors", "final/modules.json",
                 "checkpoints/2/commit_success.txt", "prepared/manifest.json", "prepared/shards/fact/00000-000.ejs",
                 "prepared/shards/title/00003-000.ejs"):
        assert want in names, names
    assert any(n.startswith("tensorboard/events.out.tfevents.") for n in names), names
    steps = [json.loads(line)["step"] for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] == [1, 2], steps       # step 1 by the first run, step 2 by the resumed one
    assert read_workdir_config(workdir).num_steps == 2
    ck = Checkpointer(wd / "checkpoints", read_only=True)
    assert sorted(ck.all_steps()) == [1, 2]
    ck.close()
    from safetensors.numpy import load as load_safetensors
    weights = load_safetensors((wd / "final" / "model.safetensors").read_bytes())
    assert weights and all(v.size for v in weights.values())


def test_workdir_in_a_missing_bucket_is_one_line(gcs_bucket):
    """`embedjax train` (a subprocess: the emulator's environment inherited) with a workdir in a bucket that
    does not exist stops before training with one line naming it, exit status 2."""
    # --distributed off: one process (earlier tests of a session may leave cluster variables in the environment
    # this subprocess inherits, e.g. libtpu's probe for the AOT tests)
    r = subprocess.run([sys.executable, "-m", "embedjax.cli", "train", "--config", "configs/tiny.py",
                        "--workdir", "gs://no-such-bucket/run", "--distributed", "off"],
                       check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "embedjax train: error: workdir gs://no-such-bucket/run: cannot write" in r.stderr, r.stderr[-3000:]
    assert "does the bucket exist?" in r.stderr and "Traceback" not in r.stderr


def test_metrics_final_copy_and_incomplete_saves_on_gcs(gcs_path, tmp_path):
    """The trainer's workdir pieces on an object store: metrics.jsonl rewritten whole (no append) and kept by a
    resumed run, TensorBoard events copied up, a local folder copied up, and a step folder without Orbax's
    commit_success.txt named as an incomplete save."""
    from embedjax.checkpoint import as_path, incomplete_checkpoints
    from embedjax.trainer import MetricWriter, _copy_tree

    workdir = as_path(str(gcs_path / "run"))
    assert str(workdir / "checkpoints") == f"{gcs_path}/run/checkpoints"
    w = MetricWriter(workdir)
    w.write(1, {"train/loss": 2.0})
    w.write(2, {"train/loss": 1.5})
    w.close()
    assert (workdir / "metrics.jsonl").read_text().count("\n") == 2
    w2 = MetricWriter(workdir)   # a resumed run keeps the earlier lines
    w2.write(3, {"train/loss": 1.0})
    w2.close()
    assert [ln[:10] for ln in (workdir / "metrics.jsonl").read_text().splitlines()] == \
        ['{"step": 1', '{"step": 2', '{"step": 3']
    events = [n for n in _object_names(str(workdir)) if n.startswith("tensorboard/events.out.tfevents.")]
    assert events and all((workdir / n).stat().length > 0 for n in events)

    src = tmp_path / "final_local"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.bin").write_bytes(b"\x00\x01")
    _copy_tree(src, workdir / "final")
    assert (workdir / "final" / "sub" / "a.bin").read_bytes() == b"\x00\x01"

    for step, done in ((4, True), (6, False)):
        (workdir / "checkpoints" / str(step) / "state" / "manifest.ocdbt").write_bytes(b"x")
        if done:
            (workdir / "checkpoints" / str(step) / "commit_success.txt").write_text("ok")
    assert [s for s, _ in incomplete_checkpoints(workdir / "checkpoints")] == [6]
