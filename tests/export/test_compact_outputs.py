"""Compact embeddings in the SavedModel: int8 / binary / ubinary codes per Matryoshka dim (calibration ranges as
graph constants), whitening inside the graph, and 2D Matryoshka ``layers{n}`` signatures, each against
`Encoder.encode` on the same texts.

Binary codes are equal bit for bit. int8 codes are equal except where a float lies within an ulp or so of a
bucket boundary: the SavedModel runs the model through TensorFlow's XLA, `Encoder.encode` through jaxlib's, and
the two compilers' float32 results differ in the last bits (max ~2e-7 for MiniLM, measured in the test), so a
handful of the 500 x 384 codes can land one step apart. The test measures and bounds that."""
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def _stsb(split: str, n: int) -> list[str]:
    rows = (REPO / "embedjax" / "data" / "shipped" / "stsb" / f"{split}.tsv").read_text(encoding="utf-8")
    return [r.split("\t")[5] for r in rows.splitlines()][:n]


@pytest.fixture(scope="module")
def minilm_compact(tmp_path_factory, minilm_dir):
    from embedjax import Encoder
    from embedjax.export.saved_model import SavedModelEncoder, export_saved_model

    enc = Encoder.load(minilm_dir)
    enc.calibrate(_stsb("train", 1000), dims=[384, 128])   # ranges from training sentences, not the test texts
    out = export_saved_model(enc, tmp_path_factory.mktemp("minilm_compact") / "1", matryoshka_dims=(128,),
                             precisions=("int8", "binary", "ubinary"), layers=(3,), warmup_batch_sizes=(1,),
                             show_progress=False)
    return enc, SavedModelEncoder(out)


def _outputs(sm, texts, signature="serving_default", batch=100):
    parts = [sm(texts[s:s + batch], signature) for s in range(0, len(texts), batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.mark.slow
def test_minilm_codes_equal_encoder_on_500_texts(minilm_compact):
    enc, sm = minilm_compact
    texts = _stsb("test", 500)
    got = _outputs(sm, texts)
    assert set(got) == {"embedding", "embedding_int8", "embedding_binary", "embedding_ubinary", "embedding_128",
                        "embedding_128_int8", "embedding_128_binary", "embedding_128_ubinary"}
    assert set(sm.metadata["outputs"]) == set(got)
    for dim, prefix in ((384, "embedding"), (128, "embedding_128")):
        floats = enc.encode(texts, dim=dim)
        np.testing.assert_allclose(got[prefix], floats, atol=1e-6, rtol=0)
        for p in ("binary", "ubinary"):   # bit for bit
            want = enc.encode(texts, dim=dim, precision=p)
            assert got[f"{prefix}_{p}"].dtype == want.dtype and got[f"{prefix}_{p}"].shape == (500, dim // 8)
            np.testing.assert_array_equal(got[f"{prefix}_{p}"], want)
        want = enc.encode(texts, dim=dim, precision="int8")
        codes = got[f"{prefix}_int8"]
        assert codes.dtype == np.int8 and codes.shape == (500, dim)
        diff = np.abs(codes.astype(np.int16) - want.astype(np.int16))
        # one step apart only where the float is within the compilers' difference of a bucket boundary
        assert diff.max() <= 1, diff.max()
        assert (diff == 0).mean() >= 0.999, (diff != 0).sum()
        # and the same quantiser: the codes of the SavedModel's own floats, quantised in numpy, are its codes
        from embedjax import quantize as qz
        np.testing.assert_array_equal(codes, qz.quantize(got[prefix], "int8", enc.quantization_ranges[dim]))


@pytest.mark.slow
def test_minilm_layers_signature_runs_the_sub_network(minilm_compact):
    enc, sm = minilm_compact
    texts = _stsb("test", 200)
    assert "layers3" in sm.signatures
    meta = sm.metadata["signatures"]["layers3"]
    assert meta["layers"] == 3 and "embedding_int8" not in meta["outputs"]
    got = _outputs(sm, texts, "layers3")
    assert set(got) == set(meta["outputs"])
    np.testing.assert_allclose(got["embedding"], enc.encode(texts, layers=3), atol=1e-6, rtol=0)
    np.testing.assert_allclose(got["embedding_128"], enc.encode(texts, layers=3, dim=128), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(got["embedding_ubinary"], enc.encode(texts, layers=3, precision="ubinary"))
    assert np.abs(got["embedding"] - enc.encode(texts)).max() > 1e-2   # not the full model


def test_whitening_and_int8_in_the_graph(tmp_path, tiny_bert_dir):
    from embedjax import Encoder
    from embedjax.export.saved_model import SavedModelEncoder, export_saved_model
    from embedjax.export.source import ExportError

    enc = Encoder.load(tiny_bert_dir)
    sample = _stsb("train", 300)
    texts = _stsb("test", 64)
    with pytest.raises(ExportError, match=r"int8 / uint8 outputs need calibration ranges for dims \[32\]"):
        export_saved_model(enc, tmp_path / "a" / "1", precisions=("int8",), show_progress=False)
    with pytest.raises(ExportError, match="choose from int8, uint8, binary, ubinary"):
        export_saved_model(enc, tmp_path / "a" / "1", precisions=("int4",), show_progress=False)
    with pytest.raises(ExportError, match=r"layers \[2\] must be in \[1, 1\]"):
        export_saved_model(enc, tmp_path / "a" / "1", layers=(2,), show_progress=False)
    enc.fit_whitening(sample, dim=16)
    enc.calibrate(sample, dims=[16, 8])
    with pytest.raises(ExportError, match="whitening was fitted on the full model"):
        export_saved_model(enc, tmp_path / "a" / "1", layers=(1,), show_progress=False)
    # through the saved folder, as a user would ship it: whitening.npz and quantization_ranges.json travel along
    folder = enc.save(tmp_path / "whitened")
    out = export_saved_model(str(folder), tmp_path / "sm" / "1", matryoshka_dims=(8,),
                             precisions=("uint8", "ubinary"), warmup_batch_sizes=(1,), show_progress=False)
    sm = SavedModelEncoder(out)
    assert sm.metadata["embedding_dim"] == 16
    assert sm.metadata["whitening"] == {"input_dim": 32, "output_dim": 16}
    got = _outputs(sm, texts)
    np.testing.assert_allclose(got["embedding"], enc.encode(texts), atol=2e-6, rtol=0)
    np.testing.assert_allclose(got["embedding_8"], enc.encode(texts, dim=8), atol=2e-6, rtol=0)
    np.testing.assert_array_equal(got["embedding_ubinary"], enc.encode(texts, precision="ubinary"))
    from embedjax import quantize as qz
    for dim, name in ((16, "embedding"), (8, "embedding_8")):
        codes = got[f"{name}_uint8"]
        assert codes.dtype == np.uint8 and codes.shape == (64, dim)
        # the in-graph quantiser is numpy's on the same floats; against Encoder.encode the whitening product
        # (TF's matmul vs numpy's) moves a float now and then across a bucket boundary: one step at most
        np.testing.assert_array_equal(codes, qz.quantize(got[name], "uint8", enc.quantization_ranges[dim]))
        want = enc.encode(texts, dim=dim, precision="uint8")
        assert np.abs(codes.astype(int) - want.astype(int)).max() <= 1
