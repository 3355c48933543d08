"""``embedjax eval`` subcommand (with a stand-in encoder, so it runs before embedjax.Encoder lands)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from _eval_helpers import HashEncoder

from embedjax.evaluate import cli

DATA = Path(__file__).parent / "data"


@pytest.fixture
def parser(monkeypatch):
    enc = HashEncoder()
    monkeypatch.setattr(cli, "load_encoder", lambda model: enc)
    p = argparse.ArgumentParser(prog="embedjax")
    cli.add_parser(p.add_subparsers(dest="command", required=True))
    p.encoder = enc
    return p


def test_eval_beir_writes_json_and_table(parser, tmp_path, capsys):
    out = tmp_path / "m" / "metrics.json"
    args = parser.parse_args(["eval", "--model", "some/model", "--task", "beir", "--data", str(DATA / "toy_beir"),
                              "--split", "test", "--output", str(out), "--cache-dir", str(tmp_path / "cache"),
                              "--query-prompt", "query: ", "--document-prompt", "passage: ", "--no-progress"])
    metrics = cli.evaluate(args)
    saved = json.loads(out.read_text())
    assert saved["metrics"] == metrics and saved["main_metric"] == "ndcg@10"
    assert saved["task"] == "beir" and saved["query_prompt"] == "query: "
    text = capsys.readouterr().out
    assert "toy_beir-test  (metrics x100)" in text
    row = next(line.split() for line in text.splitlines() if line.startswith("ndcg@10 "))
    assert row == ["ndcg@10", f"{100 * metrics['ndcg@10']:.2f}"]
    assert next(line.split() for line in text.splitlines() if line.startswith("n_queries ")) == ["n_queries", "5"]
    assert "corpus embeddings: encoded" in text
    assert metrics["n_queries"] == 5
    # The second run, through the subcommand entry point, reads the corpus from the cache.
    assert args.func(args) == 0
    assert "corpus embeddings: read from cache" in capsys.readouterr().out
    assert parser.encoder.n_encoded("document") == 8


def test_eval_stsb(parser, tmp_path, capsys):
    args = parser.parse_args(["eval", "--model", "m", "--task", "stsb", "--data", str(DATA / "sts_toy.tsv"),
                              "--no-progress"])
    metrics = cli.evaluate(args)
    assert set(metrics) == {"spearman", "pearson", "n_pairs"}
    assert f"{100 * metrics['spearman']:.2f}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--task", "beir", "--data", "DATA/toy_beir", "--split", "dev"], "qrels file not found"),
        (["--task", "stsb", "--data", "DATA/nope"], "STS data not found"),
        (["--task", "stsb", "--data", "DATA/sts_toy.tsv", "--query-prompt", "q: "], "apply to --task beir only"),
    ],
)
def test_bad_input_exits_with_one_line(parser, capsys, extra, message):
    extra = [e.replace("DATA", str(DATA)) for e in extra]
    args = parser.parse_args(["eval", "--model", "m", "--no-progress", *extra])
    with pytest.raises(SystemExit) as e:
        cli.evaluate(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_through_top_level_cli(monkeypatch, tmp_path, capsys):
    top = pytest.importorskip("embedjax.cli")
    monkeypatch.setattr(cli, "load_encoder", lambda model: HashEncoder())
    monkeypatch.setenv("EMBEDJAX_COMPILATION_CACHE", "0")
    out = tmp_path / "metrics.json"
    assert top.main(["eval", "--model", "m", "--task", "stsb", "--data", str(DATA / "sts_toy.tsv"),
                     "--output", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["metrics"]["n_pairs"] == 12
    with pytest.raises(SystemExit) as e:
        top.main(["eval", "--model", "m", "--task", "beir", "--data", str(tmp_path), "--no-progress"])
    assert e.value.code == 2 and "qrels file not found" in capsys.readouterr().err


def test_eval_beir_quantized_index(parser, tmp_path, capsys):
    """--precision / --rescore / --dim reach the evaluator; the index size is printed and written."""
    out = tmp_path / "q.json"
    args = parser.parse_args(["eval", "--model", "m", "--task", "beir", "--data", str(DATA / "toy_beir"),
                              "--no-progress", "--precision", "binary", "--rescore", "int8", "--dim", "32",
                              "--output", str(out), "--cache-dir", str(tmp_path / "cache")])
    metrics = cli.evaluate(args)
    text = capsys.readouterr().out
    assert "index: binary, 4 bytes per document + 32 for rescoring (int8); int8 ranges: sample of" in text
    saved = json.loads(out.read_text())
    assert saved["precision"] == "binary" and saved["index_bytes_per_doc"] == 4 and saved["dim"] == 32
    assert 0.0 <= metrics["ndcg@10"] <= 1.0
    bad = parser.parse_args(["eval", "--model", "m", "--task", "stsb", "--data", str(DATA / "sts_toy.tsv"),
                             "--precision", "int8"])
    with pytest.raises(SystemExit):
        cli.evaluate(bad)
    assert "--precision/--rescore/--dim apply to --task beir only" in capsys.readouterr().err


def test_eval_layers_scores_the_sub_network_of_a_real_model(tiny_bert_dir, tmp_path, capsys):
    """Not the stand-in: `embedjax eval --layers 1` loads the model folder and scores its first layer only."""
    from embedjax import Encoder
    from embedjax.cli import main
    from embedjax.evaluate.retrieval import RetrievalEvaluator

    out = tmp_path / "m.json"
    assert main(["eval", "--model", str(tiny_bert_dir), "--task", "beir", "--data", str(DATA / "toy_beir"),
                 "--layers", "1", "--no-cache", "--no-progress", "--output", str(out)]) == 0
    got = json.loads(out.read_text())["metrics"]
    sub = Encoder.load(tiny_bert_dir).truncated(1)
    want = RetrievalEvaluator.from_beir(DATA / "toy_beir", "test", use_cache=False, show_progress=False).run(
        lambda texts, role, **kw: sub.encode(texts, tower=role, show_progress=False))
    assert got["ndcg@10"] == pytest.approx(want["ndcg@10"], abs=1e-9)
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--model", str(tiny_bert_dir), "--task", "stsb", "--data", str(DATA / "sts_toy.tsv"),
              "--layers", "5", "--no-progress"])
    assert exc.value.code == 2
    assert "--layers 5: layers must be in [1, 2]" in capsys.readouterr().err
