"""Readers: formats, the shipped files, and bad input (file:line messages, skip-and-count)."""

from __future__ import annotations

import json

import pytest
from _data_helpers import write_jsonl

from embedjax.data import sources
from embedjax.data.sources import DataError


def test_jsonl_pairs_and_triplets(tmp_path):
    p = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"query": "q1", "positive": "p1"},
            {
                "query": "q2",
                "positive": {"title": "T", "text": "p2"},
                "negatives": ["n1", {"title": "U", "text": "n2"}],
                "scores": [0.9, 0.2, 0.1],
            },
            "",  # blank lines are not data
        ],
    )
    ex, st = sources.read_pairs(p)
    assert st.examples == 2 and st.skipped == 0
    assert ex[0] == sources.make_example("q1", "p1")
    assert ex[1]["positive_title"] == "T" and ex[1]["positive"] == "p2"
    assert ex[1]["negatives"] == ["n1", "n2"] and ex[1]["negative_titles"] == ["", "U"]
    assert ex[1]["scores"] == pytest.approx([0.9, 0.2, 0.1])


def test_tsv_pairs_with_and_without_header(tmp_path):
    (tmp_path / "a.tsv").write_text('q "1"\tp1\tn1\tn2\nq2\tp2\n', encoding="utf-8")
    ex, _ = sources.read_pairs(tmp_path / "a.tsv")
    assert ex[0]["query"] == 'q "1"' and ex[0]["negatives"] == ["n1", "n2"]  # no quote processing
    assert ex[1]["negatives"] == []
    (tmp_path / "b.tsv").write_text(
        "query\tpositive\tnegative\tscore_pos\tscore_neg\nq\tp\tn\t1.5\t0.25\n", encoding="utf-8"
    )
    ex, _ = sources.read_pairs(tmp_path / "b.tsv")
    assert len(ex) == 1 and ex[0]["negatives"] == ["n"] and ex[0]["scores"] == [1.5, 0.25]


@pytest.mark.parametrize(
    "line, needle",
    [
        ('{"query": "q", "positive": "p"', "not valid JSON"),
        ('{"query": "q"}', "missing field 'positive'"),
        ('{"positive": "p"}', "missing field 'query'"),
        ('{"query": "", "positive": "p"}', "field 'query' is empty"),
        ('{"query": "q", "positive": "p", "negatives": "n"}', "field 'negatives' is str, expected a list"),
        ('{"query": "q", "positive": "p", "negatives": ["n"], "scores": [1.0]}', "expected 2"),
        ('{"query": "q", "positive": "p", "scores": ["x"]}', "scores[0]"),
        ('["q", "p"]', "expected a JSON object"),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, line, needle):
    p = write_jsonl(tmp_path / "bad.jsonl", [{"query": "a", "positive": "b"}, line])
    with pytest.raises(DataError) as e:
        sources.read_pairs(p)
    assert f"{p}:2:" in str(e.value) and needle in str(e.value)


def test_skip_mode_counts_every_dropped_line(tmp_path, caplog):
    p = write_jsonl(
        tmp_path / "mixed.jsonl",
        [{"query": "a", "positive": "b"}, "{oops", {"query": "c"}, {"query": "d", "positive": "e"}],
    )
    ex, st = sources.read_pairs(p, on_error="skip")
    assert [e["query"] for e in ex] == ["a", "d"]
    assert st.skipped == 2 and st.lines == 4 and st.examples == 2
    assert sum(st.reasons.values()) == 2 and st.first_skipped.startswith(f"{p}:2:")
    assert "skipped 2 malformed line(s)" in caplog.text
    (tmp_path / "bad.bin").write_bytes(b'{"query": "\xff", "positive": "x"}\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes((tmp_path / "bad.bin").read_bytes())
    with pytest.raises(DataError, match=r"bad.jsonl:1: invalid UTF-8"):
        sources.read_pairs(bad)


def test_empty_and_all_skipped_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty.jsonl: no examples"):
        sources.read_examples("pairs", tmp_path / "empty.jsonl")
    write_jsonl(tmp_path / "junk.jsonl", ["nope", "{}"])
    with pytest.raises(DataError, match=r"no examples \(2 malformed line\(s\) skipped\)"):
        sources.read_examples("pairs", tmp_path / "junk.jsonl", on_error="skip")
    with pytest.raises(FileNotFoundError):
        sources.read_pairs(tmp_path / "missing.jsonl")


def test_stsb_shipped_files(shipped):
    counts = {"train": 5749, "dev": 1500, "test": 1379}
    for split, n in counts.items():
        path = shipped / "stsb" / f"{split}.tsv"
        ex, st = sources.read_scored_pairs(path)
        assert len(ex) == n and st.skipped == 0
        raw = path.read_text(encoding="utf-8").split("\n")[:-1]
        for e, line in zip(ex[:50] + ex[-50:], raw[:50] + raw[-50:]):
            f = line.split("\t")
            assert (e["query"], e["positive"], e["scores"]) == (f[5], f[6], [float(f[4])])
    train, _ = sources.read_scored_pairs(shipped / "stsb" / "train.tsv")
    assert any('"' in e["query"] or '"' in e["positive"] for e in train)  # quotes kept verbatim
    assert any(e["positive"].endswith(" ") or e["query"].endswith(" ") for e in train)  # trailing spaces kept
    nine = [
        line
        for line in (shipped / "stsb" / "train.tsv").read_text(encoding="utf-8").split("\n")
        if line.count("\t") == 8
    ]
    assert len(nine) == 197


def test_stsb_bad_field_count(tmp_path):
    p = tmp_path / "s.tsv"
    p.write_text("g\tf\t2012\t1\t3.5\ta\tb\ng\tf\t2012\t2\t4.0\ta\tb\textra\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"s.tsv:2: expected 7 or 9 tab-separated fields .* got 8"):
        sources.read_scored_pairs(p)
    p.write_text("g\tf\t2012\t1\tfive\ta\tb\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"s.tsv:1: score \(field 5\) is 'five'"):
        sources.read_scored_pairs(p)


def test_beir_shipped_train_pairs(shipped):
    ex, st = sources.beir_pairs(shipped / "scifact", "train")
    assert len(ex) == 919 and len({e["query_id"] for e in ex}) == 809 and st.skipped == 0
    corpus = {}
    for line in (shipped / "scifact" / "corpus.jsonl").read_text(encoding="utf-8").splitlines():
        d = json.loads(line)
        corpus[d["_id"]] = (d["title"] + " " + d["text"]).strip()
    queries = {
        json.loads(x)["_id"]: json.loads(x)["text"]
        for x in (shipped / "scifact" / "queries.jsonl").read_text(encoding="utf-8").splitlines()
    }
    for e in ex:
        assert sources.doc_text(e["positive_title"], e["positive"]) == corpus[e["positive_id"]]
        assert e["query"] == queries[e["query_id"]]


def test_beir_unknown_ids(tmp_path, shipped):
    d = tmp_path / "beir"
    (d / "qrels").mkdir(parents=True)
    write_jsonl(d / "corpus.jsonl", [{"_id": "d1", "title": "", "text": "doc one"}])
    write_jsonl(d / "queries.jsonl", [{"_id": "q1", "text": "query one"}])
    (d / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td9\t1\nq7\td1\t1\n")
    with pytest.raises(DataError, match="document 'd9' not in corpus.jsonl"):
        sources.beir_pairs(d, "train")
    ex, st = sources.beir_pairs(d, "train", on_error="skip")
    assert len(ex) == 1 and st.skipped == 2
    (d / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\n")
    with pytest.raises(DataError, match=r"train.tsv:2: expected 3 fields"):
        sources.beir_pairs(d, "train")
