"""The first ten minutes: `embedjax train` run as a user runs it (a fresh process, output not a terminal) says
only embedjax's own lines: no TF / absl / XLA / CUDA / libtpu / transformers / TFDS noise; long phases log
progress lines with an ETA; the run ends with a result table, summary.md and a summary.png that has curves."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("seqio")
pytest.importorskip("matplotlib")

from _processes import REPO  # noqa: E402

OUR_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) embedjax[.\w]*: ")


def _mini_beir(src, dst, n_queries=12, n_docs=300):
    """SciFact's first test queries, their positives and other abstracts: an evaluation of a few seconds."""
    qrels = [r.split("\t") for r in (src / "qrels" / "test.tsv").read_text().splitlines()[1:] if r.strip()]
    keep_q = list(dict.fromkeys(q for q, _, _ in qrels))[:n_queries]
    corpus = [json.loads(x) for x in (src / "corpus.jsonl").read_text().splitlines() if x.strip()]
    pos = {d for q, d, _ in qrels if q in keep_q}
    keep_d = pos | {c["_id"] for c in corpus[:n_docs]}
    (dst / "qrels").mkdir(parents=True)
    (dst / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        "\t".join(r) + "\n" for r in qrels if r[0] in keep_q))
    (dst / "queries.jsonl").write_text("".join(
        x + "\n" for x in (src / "queries.jsonl").read_text().splitlines() if x.strip() and json.loads(x)["_id"] in keep_q))
    (dst / "corpus.jsonl").write_text("".join(json.dumps(c) + "\n" for c in corpus if c["_id"] in keep_d))
    return dst


@pytest.mark.slow
def test_train_cli_is_quiet_shows_progress_and_draws_a_summary(tmp_path):
    from embedjax.data.sources import shipped_path

    beir = _mini_beir(shipped_path("scifact"), tmp_path / "beir")
    env = {k: v for k, v in os.environ.items()   # the defaults under test, not the test runner's; nor what
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "JAX_PLATFORMS", "TRANSFORMERS_NO_ADVISORY_WARNINGS",
                        "EMBEDJAX_VERBOSE") and not k.startswith("TPU_")}   # libtpu left in this process
    env.update(HF_HUB_OFFLINE="1", EMBEDJAX_PROGRESS_SECONDS="0", PYTHONPATH=str(REPO))
    work = tmp_path / "run"
    cmd = [sys.executable, "-m", "embedjax.cli", "train", "--config", str(REPO / "configs" / "tiny.py"), "--workdir", str(work),
           "--fake-devices", "2", "--config.mesh.data=2", "--config.num_steps=6", "--config.log_every_steps=100",
           f"--config.eval.tasks=('beir:{beir}:test',)", "--config.data.path=" + str(shipped_path("scifact"))]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    foreign = [line for line in r.stderr.splitlines() if line.strip() and not OUR_LINE.match(line)]
    assert not foreign, "lines not from embedjax on stderr:\n" + "\n".join(foreign[:20])
    # progress that shows in a log file: evaluation and training lines with done/total and an ETA
    assert re.search(r"encode corpus \S+: \d+/\d+ doc \(\d+%\), [\d.]+ doc/s, ETA \d:\d\d:\d\d", r.stderr)
    assert re.search(r"step \d/6 .* ETA \d:\d\d:\d\d", r.stderr), r.stderr[-2000:]
    assert "nan step/s" not in r.stderr
    # the end: a result table, the summary's paths, the peak memory
    out = r.stdout.splitlines()
    assert re.match(r"metric\s+before\s+after\s+change", out[0]), r.stdout
    assert re.match(r"beir/beir/test/ndcg@10\s+[\d.]+\s+[\d.]+\s+[+-][\d.]+", out[1]), r.stdout
    assert re.search(r"trained to step 6 in [\d.]+ min \(peak memory [\d.]+ GiB\)", r.stdout)
    assert str(work / "summary.png") in r.stdout and str(work / "summary.md") in r.stdout
    md = (work / "summary.md").read_text()
    assert "![" in md and "ndcg@10" in md and "peak resident memory" in md
    _assert_plotted(work / "summary.png")


def _assert_plotted(path):
    """The picture is looked at: it has the loss curve (matplotlib's tab:blue) and the evaluation line
    (tab:blue too, the first colour of its own axes) spread over many pixels, not just axes and text."""
    import matplotlib.image as mpimg

    img = mpimg.imread(path)[..., :3]
    assert img.shape[0] > 200 and img.shape[1] > 600
    ink = (img < 0.9).any(-1).mean()
    blue = (np.abs(img - np.array([0x1F, 0x77, 0xB4]) / 255).max(-1) < 0.08)
    orange = (np.abs(img - np.array([0xFF, 0x7F, 0x0E]) / 255).max(-1) < 0.08)
    assert 0.01 < ink < 0.5, ink
    assert blue.sum() > 300 and orange.sum() > 100, (blue.sum(), orange.sum())
    # the blue pixels span the loss panel's width: a curve, not a legend swatch
    cols = np.nonzero(blue[:, : img.shape[1] // 3].any(0))[0]
    assert cols.size and cols.max() - cols.min() > img.shape[1] // 6


def test_python_api_is_quiet(tiny_bert_dir):
    """`from embedjax import Encoder` and an encode, in a fresh interpreter with libtpu installed and no TPU:
    nothing on stderr (no libtpu probing, no TF / transformers notices)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "JAX_PLATFORMS", "TRANSFORMERS_NO_ADVISORY_WARNINGS",
                        "EMBEDJAX_VERBOSE", "XLA_FLAGS")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    code = ("from embedjax import Encoder\n"
            f"e = Encoder.load({str(tiny_bert_dir)!r})\n"
            "print(e.encode(['a sentence']).shape)\n"
            "import tensorflow\n")   # TF's import notices are caught too
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "(1, 32)" and r.stderr.strip() == "", r.stderr
