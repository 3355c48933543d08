"""`embedjax export` on the command line."""
import json

import numpy as np
import pytest

from embedjax.cli import main


def test_export_cli_writes_a_saved_model(tmp_path, tiny_bert_dir, tiny_enc, capsys):
    out = tmp_path / "models" / "tiny" / "1"
    rc = main(["export", "--model", str(tiny_bert_dir), "--output", str(out), "--matryoshka-dims", "16",
               "--query-prompt", "query: ", "--max-length", "48", "--warmup-batch-sizes", "1,4",
               "--model-name", "tiny"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "signatures serving_default, query, document" in printed
    assert "--xla_cpu_compilation_enabled=true" in printed
    meta = json.loads((out / "assets.extra" / "embedjax_export.json").read_text())
    assert meta["outputs"] == ["embedding", "embedding_16"] and meta["length_buckets"] == [16, 32, 48]
    assert meta["warmup"]["batch_sizes"] == [1, 4] and meta["signatures"]["query"]["prompt"] == "query: "

    from embedjax.export.saved_model import SavedModelEncoder
    sm = SavedModelEncoder(out)
    np.testing.assert_allclose(sm.encode(["hi there"], signature="query"),
                               tiny_enc.encode(["hi there"], prompt="query: ", max_length=48),
                               atol=1e-4, rtol=0)


def test_export_cli_errors_are_one_line(tmp_path, tiny_bert_dir, capsys):
    rc = main(["export", "--model", str(tiny_bert_dir), "--output", str(tmp_path / "1"),
               "--platforms", "cpu,gpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "platforms: unknown ['gpu']" in err
    rc = main(["export", "--workdir", str(tmp_path / "missing"), "--output", str(tmp_path / "2")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no such folder" in err
    with pytest.raises(SystemExit):  # --workdir and --model are exclusive
        main(["export", "--workdir", "a", "--model", "b", "--output", "c"])


@pytest.mark.slow
def test_export_cli_from_a_workdir_both_formats(t5_workdir, tmp_path, capsys):
    assert main(["export", "--workdir", str(t5_workdir), "--output", str(tmp_path / "sm" / "1"),
                 "--step", "3"]) == 0
    meta = json.loads((tmp_path / "sm" / "1" / "assets.extra" / "embedjax_export.json").read_text())
    assert meta["checkpoint_step"] == 3
    assert meta["signatures"]["query"]["prompt"]["template"] == "query: {text}"
    assert main(["export", "--workdir", str(t5_workdir), "--output", str(tmp_path / "st"),
                 "--format", "sentence-transformers"]) == 0
    assert (tmp_path / "st" / "modules.json").is_file()
    # sentence-transformers itself reads the exported folder and gives the embeddings of embedjax's own model
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from embedjax import Encoder

    texts = ["a first sentence", "query: and a second one, a little longer than the first"]
    ref = Encoder.load(t5_workdir / "final").encode(texts)
    got = SentenceTransformer(str(tmp_path / "st"), device="cpu").encode(texts)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    rc = main(["export", "--workdir", str(t5_workdir), "--output", str(tmp_path / "x" / "1"), "--step", "99"])
    assert rc == 2 and "step 99" in capsys.readouterr().err
