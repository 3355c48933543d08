"""Fixtures for the evaluation tests: a deterministic stand-in encoder and the shared real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _eval_helpers import HashEncoder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def hash_encoder() -> HashEncoder:
    return HashEncoder()


def shared_data_dir() -> Path | None:
    """Folder with ``stsb/`` and ``scifact/``: the copies shipped in ``embedjax/data/shipped``, else
    ``$EMBEDJAX_SHARED_DATA``, else the project's ``../shared/data`` beside the repo."""
    for cand in (REPO / "embedjax" / "data" / "shipped", os.environ.get("EMBEDJAX_SHARED_DATA"),
                 REPO.parent / "shared" / "data"):
        if cand and (Path(cand) / "stsb" / "test.tsv").is_file() and (Path(cand) / "scifact").is_dir():
            return Path(cand)
    return None


@pytest.fixture
def shared_data() -> Path:
    d = shared_data_dir()
    if d is None:
        msg = "STS-B / SciFact data not found (embedjax/data/shipped, ../shared/data); set EMBEDJAX_SHARED_DATA"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return d
