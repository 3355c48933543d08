"""colab/*.ipynb run top to bottom, headless (nbclient), in their small CI setting; no cell errors; the plots
are in the outputs (image/png). A notebook that breaks fails the build."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COLAB = REPO / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))
# What each notebook needs beyond embedjax's core dependencies.
NEEDS = {"export_and_serve": ("tensorflow", "tensorflow_text"), "finetune": ("tensorflow_datasets", "seqio")}
# How many plots each notebook draws.
PLOTS = {"quickstart": 1, "finetune": 1, "export_and_serve": 1}

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")


def test_every_notebook_is_covered():
    assert {p.stem for p in NOTEBOOKS} == set(PLOTS)


def _clean_outputs(nb) -> list[str]:
    """Names of code cells that carry saved outputs or execution counts (commit notebooks without them)."""
    return [c.source.splitlines()[0] for c in nb.cells if c.cell_type == "code" and (c.outputs or c.execution_count)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_clean_and_installs_on_colab(path):
    nb = nbformat.read(path, as_version=4)
    assert not _clean_outputs(nb), f"{path.name}: clear the outputs before committing"
    first = nb.cells[1].source if nb.cells[0].cell_type == "markdown" else nb.cells[0].source
    assert '"google.colab" in sys.modules' in first and "pip" in first and "EMBEDJAX_NOTEBOOK_CI" in first
    assert "ON_TPU" in first and ",tpu" in first


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_ci_mode(path, tmp_path):
    for mod in NEEDS.get(path.stem, ()):
        pytest.importorskip(mod)
    nb = nbformat.read(path, as_version=4)
    env_backup = dict(os.environ)
    # the kernel inherits this process's environment: small mode, no network, one real CPU device, no
    # fake devices from tests/conftest.py (the notebook runs as a user would run it)
    os.environ.update(EMBEDJAX_NOTEBOOK_CI="1", HF_HUB_OFFLINE="1", MPLBACKEND="module://matplotlib_inline.backend_inline",
                      EMBEDJAX_COMPILATION_CACHE=str(tmp_path / "xla"), JAX_PLATFORMS="cpu")
    os.environ.pop("XLA_FLAGS", None)
    try:
        client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                         resources={"metadata": {"path": str(COLAB)}})
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})]
    assert len(images) >= PLOTS[path.stem], f"{path.name}: expected {PLOTS[path.stem]} plot(s), got {len(images)}"
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                     if o.output_type == "stream")
    assert "small (CI) mode: True" in text
