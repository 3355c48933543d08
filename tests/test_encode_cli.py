"""`embedjax encode` end to end."""
import json
import re

import numpy as np
import pytest

from embedjax.cli import main


def test_encode_10k_lines_progress_and_bounded_compilations(tiny_bert_dir, tmp_path, capsys, caplog, monkeypatch,
                                                            stsb_test_sentences):
    """Output is not a terminal here: progress comes as log lines (every EMBEDJAX_PROGRESS_SECONDS, 0 = each
    batch) with done/total and an ETA, as in a log file on a pod."""
    import logging

    from embedjax.tokenize import bucket_lengths

    monkeypatch.setenv("EMBEDJAX_PROGRESS_SECONDS", "0")
    caplog.set_level(logging.INFO, logger="embedjax.progress")
    src = tmp_path / "in.txt"
    lines = [stsb_test_sentences[i % len(stsb_test_sentences)] + f" #{i}" for i in range(10_000)]
    lines[5] = " ".join(["long"] * 400)   # forces the top bucket
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out.npy"
    assert main(["encode", "--model", str(tiny_bert_dir), "--input", str(src), "--output", str(out),
                 "--batch-size", "64"]) == 0
    emb = np.load(out)
    assert emb.shape == (10_000, 32) and emb.dtype == np.float32
    captured = capsys.readouterr()
    lines = [r.getMessage() for r in caplog.records if r.name == "embedjax.progress"]
    assert any(re.match(r"encode: \d+/157 batch \(\d+%\), [\d.]+ batch/s, ETA \d:\d\d:\d\d", m) for m in lines), lines
    assert any(m.startswith("encode: 157/157 batch (100%)") for m in lines), lines
    n = int(captured.out.split(" compilations")[0].rsplit(";", 1)[1])
    assert 1 <= n <= len(bucket_lengths(128))


def test_encode_jsonl_with_prompt_and_dim(tiny_bert_dir, tmp_path):
    from embedjax import Encoder

    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["a", "b c", "ü"])) + "\n")
    out = tmp_path / "out.npy"
    assert main(["encode", "--model", str(tiny_bert_dir), "--input", str(src), "--output", str(out),
                 "--prompt", "query: ", "--dim", "8"]) == 0
    ref = Encoder.load(tiny_bert_dir).encode(["a", "b c", "ü"], prompt="query: ", dim=8)
    np.testing.assert_allclose(np.load(out), ref, atol=1e-6)


def test_encode_layers_runs_the_sub_network(tiny_bert_dir, tmp_path, capsys):
    from embedjax import Encoder

    src = tmp_path / "in.txt"
    src.write_text("a\nb c\n", encoding="utf-8")
    out = tmp_path / "out.npy"
    assert main(["encode", "--model", str(tiny_bert_dir), "--input", str(src), "--output", str(out),
                 "--layers", "1", "--dim", "16"]) == 0
    enc = Encoder.load(tiny_bert_dir)
    np.testing.assert_allclose(np.load(out), enc.encode(["a", "b c"], layers=1, dim=16), atol=1e-6)
    assert np.abs(np.load(out) - enc.encode(["a", "b c"], dim=16)).max() > 1e-3
    assert main(["encode", "--model", str(tiny_bert_dir), "--input", str(src), "--output", str(out),
                 "--layers", "9"]) == 2
    assert "--layers 9: layers must be in [1, 2]" in capsys.readouterr().err


@pytest.mark.parametrize("content,suffix,message", [
    (b"ok\n\xff\xfe bad\n", ".txt", "in.txt:2: invalid UTF-8"),
    (b'{"text": "a"}\n{"txt": "b"}\n', ".jsonl", "in.jsonl:2: missing field 'text'"),
    (b'{"text": "a"}\n{"text": \n', ".jsonl", "in.jsonl:2: not valid JSON"),
    (b'{"text": 5}\n', ".jsonl", "in.jsonl:1: field 'text' is int, expected a string"),
])
def test_bad_input_files_name_file_and_line(tiny_bert_dir, tmp_path, capsys, content, suffix, message):
    src = tmp_path / f"in{suffix}"
    src.write_bytes(content)
    out = tmp_path / "out.npy"
    assert main(["encode", "--model", str(tiny_bert_dir), "--input", str(src), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_missing_model_is_one_line(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("a\n")
    assert main(["encode", "--model", str(tmp_path / "nope"), "--input", str(src),
                 "--output", str(tmp_path / "o.npy")]) == 2
    assert "no such model folder" in capsys.readouterr().err
