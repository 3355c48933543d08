"""The data a config names: a TFDS dataset by name, `embedjax prepare` ahead of training, and the data.* keys
each kind reads (a key of another kind is an error, never ignored)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from embedjax.config import ConfigError, base_config, validate
from embedjax.data import inputs, prepared
from embedjax.tokenize import TextTokenizer, load_tokenizer

from _mixture import GECKO, INSTR, scifact_rows, write_sources  # noqa: E402


def _tiny_tfds(data_dir, rows):
    import tensorflow_datasets as tfds

    class EmbedjaxTinyPairs(tfds.core.GeneratorBasedBuilder):
        """Claim -> abstract pairs (a dataset of the TFDS catalog, registered by defining it)."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "claim": tfds.features.Text(), "abstract": tfds.features.Text(),
                "hard": tfds.features.Sequence(tfds.features.Text())}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, r in enumerate(rows):
                yield i, {"claim": r["query"], "abstract": r["positive"]["text"], "hard": r["negatives"]}

    EmbedjaxTinyPairs(data_dir=str(data_dir)).download_and_prepare()


def test_a_tfds_dataset_by_name_is_prepared_with_its_field_mapping(tmp_path, shipped, minilm_dir):
    rows = scifact_rows(shipped, 60)["fact"]
    _tiny_tfds(tmp_path / "tfds", rows)
    c = base_config()
    c.init_from = str(minilm_dir)
    c.data.kind = "tfds"
    c.data.tfds_name = "embedjax_tiny_pairs:1.0.0"
    c.data.tfds_data_dir = str(tmp_path / "tfds")
    c.data.split = "train"
    c.data.fields = {"query": "claim", "positive": "abstract", "negatives": "hard"}
    c.data.instructions = {"embedjax_tiny_pairs": INSTR["fact"]}
    c.data.query_prompt, c.data.document_prompt = GECKO
    c.data.num_shards = 3
    c.max_query_length, c.max_document_length = 32, 64
    validate(c)
    tok = TextTokenizer(load_tokenizer(minilm_dir), 64)
    m = inputs.prepare_for_config(c, tok, str(tmp_path / "out"))
    assert m["tasks"]["embedjax_tiny_pairs"]["examples"] == 60 and len(m["shards"]) == 3
    assert m["tasks"]["embedjax_tiny_pairs"]["instruction"] == INSTR["fact"]
    data = prepared.PreparedData(tmp_path / "out")
    ts = prepared.ShardedTask("t", [data.open(s) for s in data.shards("embedjax_tiny_pairs")], "x")
    queries = sorted(tuple(ts.query(i).tolist()) for i in range(len(ts)))
    want = sorted(tuple(x) for x in tok.tokenize([f"task: {INSTR['fact']} | query: {r['query']}" for r in rows],
                                                 32).ids)
    assert queries == want
    assert all(ts.num_negatives(i) == 2 for i in range(len(ts)))
    c.data.tfds_name = "no_such_dataset_xyz"
    with pytest.raises(prepared.DataError, match="no_such_dataset_xyz"):
        inputs.config_inputs(c)


@pytest.mark.parametrize("key,value,message", [
    ("data.sources", [{"name": "a", "files": "x.jsonl"}], "data.sources is not read by data.kind 'beir'"),
    ("data.mixture", "mix", "data.mixture is not read by data.kind 'beir'"),
    ("data.fields", {"query": "q"}, "data.fields is not read by data.kind 'beir'"),
])
def test_keys_of_another_kind_are_errors(key, value, message):
    c = base_config()
    c.init_from = "x"
    sec, _, k = key.partition(".")
    c[sec][k] = value
    with pytest.raises(ConfigError, match=message):
        validate(c)


def test_bad_sources_are_config_errors():
    c = base_config()
    c.init_from = "x"
    c.data.kind = "files"
    c.data.sources = [{"name": "a", "files": "x.jsonl", "format": "csv"}]
    with pytest.raises(ConfigError, match=r"data.sources\[0\] 'a': format 'csv' is not one of"):
        validate(c)
    c.data.sources = [{"name": "a", "files": "x.jsonl"}, {"name": "a", "files": "y.jsonl"}]
    with pytest.raises(ConfigError, match="names a task twice"):
        validate(c)


def test_embedjax_prepare_cli_then_training_reads_the_manifest_only(tmp_path, shipped, minilm_dir):
    srcs = write_sources(tmp_path / "in", scifact_rows(shipped, 40), files_per_task=2)
    cfg = tmp_path / "cfg.py"
    cfg.write_text(textwrap.dedent(f"""
        from embedjax.config import base_config
        def get_config(arg=None):
            c = base_config()
            c.init_from = {str(minilm_dir)!r}
            c.data.kind = "files"
            c.data.sources = {srcs!r}
            c.data.query_prompt, c.data.document_prompt = {GECKO!r}
            c.max_query_length, c.max_document_length = 32, 64
            return c
    """))
    from _processes import REPO, child_env

    r = subprocess.run([sys.executable, "-m", "embedjax.cli", "prepare", "--config", str(cfg), "--workdir",
                        str(tmp_path / "run"), "--config.data.rows_per_shard=15"],
                       cwd=REPO, env=child_env(1), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "60 examples, 6 shards" in r.stdout and f"instruction {INSTR['fact']!r}" in r.stdout
    m = json.loads((tmp_path / "run" / "prepared" / "manifest.json").read_text())
    # the trainer's iterator over the same config finds the folder prepared and opens only shards
    from embedjax.config import load_config

    c = load_config(str(cfg), ["data.rows_per_shard=15"])
    tok = TextTokenizer(load_tokenizer(minilm_dir), 64)
    it = inputs.train_iterator(c, tok, tmp_path / "run", process_index=0, process_count=1)
    b = next(it)
    assert b["query_ids"].shape[0] == c.batch_size and np.all(b["task_id"] == b["task_id"][0])
    assert m["fingerprint"] == json.loads((tmp_path / "run" / "prepared" / "manifest.json").read_text())["fingerprint"]
    bad = subprocess.run([sys.executable, "-m", "embedjax.cli", "prepare", "--config", str(cfg)], cwd=REPO,
                         env=child_env(1), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "give --workdir" in bad.stderr
