"""STS-B reader and STS evaluator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedjax.evaluate.base import encode_fn_from_encoder
from embedjax.evaluate.sts import STSData, STSEvaluator, STSFormatError, read_stsb, resolve_sts_path

DATA = Path(__file__).parent / "data"


def test_reads_7_and_9_field_lines_verbatim():
    data = read_stsb(DATA / "sts_toy.tsv")
    assert len(data.sentences1) == 12
    assert data.scores[:3].tolist() == [5.0, 4.2, 0.4]
    assert data.sentences2[1] == "A dog is barking at the postman."  # 9-field line: extra fields dropped
    assert data.sentences2[6] == 'He bought a new "red" car.'  # quotes kept: no CSV quoting
    assert data.sentences2[9] == "The train will arrive around midday "  # trailing space kept


@pytest.mark.parametrize(
    "line,message",
    [
        ("g\tf\t2012\t1\t3.0\tonly one sentence", r"bad\.tsv:2: expected at least 7 tab-separated fields .* got 6"),
        ("g\tf\t2012\t1\tfive\ta\tb", r"bad\.tsv:2: field 5 \(score\) is not a number: 'five'"),
        ("g\tf\t2012\t1\tnan\ta\tb", r"bad\.tsv:2: field 5 \(score\) is not finite"),
        ("g\tf\t2012\t1\t3.0\t \tb", r"bad\.tsv:2: field 6 \(sentence1\) is empty"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    p = tmp_path / "bad.tsv"
    p.write_text("g\tf\t2012\t0\t1.0\ta\tb\n" + line + "\n")
    with pytest.raises(STSFormatError, match=message):
        read_stsb(p)


def test_empty_and_missing(tmp_path):
    (tmp_path / "test.tsv").write_text("\n\n")
    with pytest.raises(STSFormatError, match="no sentence pairs"):
        read_stsb(tmp_path / "test.tsv")
    with pytest.raises(FileNotFoundError, match=r"no STS file for split 'dev'"):
        resolve_sts_path(tmp_path, "dev")
    assert resolve_sts_path(tmp_path, "test") == tmp_path / "test.tsv"


def test_hand_computed_spearman_and_pearson():
    # Unit vectors at known cosines to the first sentence of each pair.
    vec = {"a": [1, 0], "b": [1, 0], "c": [0, 1], "d": [0.6, 0.8], "e": [0.8, 0.6], "x": [1, 0]}
    data = STSData(["a", "x", "x", "x"], ["b", "c", "d", "e"], np.array([5.0, 1.0, 4.0, 2.0]))
    calls = []

    def encode_fn(texts, role):
        calls.append((role, list(texts)))
        return np.asarray([vec[t] for t in texts], dtype=np.float32) * 3.0  # unnormalised on purpose

    m = STSEvaluator(data, show_progress=False).run(encode_fn)
    # cosines [1, 0, .6, .8] rank [4, 1, 2, 3]; gold rank [4, 1, 3, 2]: rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert m["spearman"] == pytest.approx(0.8)
    cos, gold = np.array([1, 0, 0.6, 0.8]), np.array([5.0, 1.0, 4.0, 2.0])
    r = ((cos - cos.mean()) * (gold - gold.mean())).sum() / np.sqrt(
        ((cos - cos.mean()) ** 2).sum() * ((gold - gold.mean()) ** 2).sum())
    assert m["pearson"] == pytest.approx(r, abs=1e-6)
    assert m["n_pairs"] == 4
    # Each distinct sentence once, as role "query".
    assert [role for role, _ in calls] == ["query"]
    assert sorted(calls[0][1]) == ["a", "b", "c", "d", "e", "x"]


def test_toy_file_with_encoder(hash_encoder):
    ev = STSEvaluator.from_file(DATA / "sts_toy.tsv", show_progress=False)
    assert ev.name == "sts_toy"
    m = ev.run(encode_fn_from_encoder(hash_encoder))
    assert -1.0 <= m["spearman"] <= 1.0 and m["spearman"] > 0.3  # word overlap tracks these gold scores
    assert hash_encoder.n_encoded("query") == 23  # 24 sentences, one repeated
    assert hash_encoder.n_encoded("document") == 0


def test_constant_gold_is_an_error():
    data = STSData(["a", "b"], ["c", "d"], np.array([2.0, 2.0]), source="x.tsv")
    with pytest.raises(ValueError, match="x.tsv: need at least two pairs with different gold scores"):
        STSEvaluator(data, show_progress=False).run(lambda t, r: np.ones((len(t), 2), np.float32))
