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
    """The project's shared data (``../shared/data`` beside the repo, or ``$EMBEDJAX_SHARED_DATA``)."""
    for cand in (os.environ.get("EMBEDJAX_SHARED_DATA"), REPO.parent / "shared" / "data", "/work/shared/data"):
        if cand and (Path(cand) / "stsb" / "test.tsv").is_file():
            return Path(cand)
    return None


@pytest.fixture
def shared_data() -> Path:
    d = shared_data_dir()
    if d is None:
        msg = "shared data (stsb/, scifact/) not found beside the repo; set EMBEDJAX_SHARED_DATA"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return d
