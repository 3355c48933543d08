"""Fixtures for the input-pipeline tests: shipped data, MiniLM's tokenizer as a seqio vocabulary, prepared
TFDS datasets (in a per-session temporary data_dir) and registered seqio tasks."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "embedjax" / "data" / "shipped"


@pytest.fixture(scope="session")
def shipped() -> Path:
    if not (SHIPPED / "scifact" / "corpus.jsonl").is_file():
        pytest.fail(f"{SHIPPED}: shipped data missing")
    return SHIPPED


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def minilm_vocab(minilm_dir):
    from embedjax.data import tf_tokenize

    return tf_tokenize.load_vocabulary(minilm_dir)


@pytest.fixture(scope="session")
def hf_minilm(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir))


@pytest.fixture(scope="session")
def scifact_builder(shipped, tfds_dir):
    from embedjax.data.tfds_builders import prepare_dataset

    return prepare_dataset("beir", shipped / "scifact", splits=("train",), data_dir=tfds_dir)


@pytest.fixture(scope="session")
def stsb_builder(shipped, tfds_dir):
    from embedjax.data.tfds_builders import prepare_dataset

    return prepare_dataset("scored_pairs", {"train": shipped / "stsb" / "train.tsv"}, data_dir=tfds_dir)


@pytest.fixture(scope="session")
def scifact_tokenized(scifact_builder, minilm_vocab):
    """SciFact train pairs tokenized with MiniLM (no prompt), query 64 / document 256 tokens, one host."""
    from embedjax.data import tasks

    tasks.add_task("t_scifact", scifact_builder, minilm_vocab)
    return tasks.load_tokenized("t_scifact", "train", {"query": 64, "positive": 256})["t_scifact"]


@pytest.fixture(scope="session")
def scifact_pairs(shipped):
    """The raw SciFact train pairs (sources.Example records), in file order (row i has idx i)."""
    from embedjax.data.sources import beir_pairs

    return beir_pairs(shipped / "scifact", "train")[0]
