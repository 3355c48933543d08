"""Shared exports for the serving tests: one MiniLM SavedModel and one tiny-BERT SavedModel per session, and
(for the slow tests) a tiny Sentence-T5 workdir trained a few steps with a SentencePiece vocabulary trained
here."""
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tensorflow_text")
pytest.importorskip("tensorflow_serving")
pytest.importorskip("seqio")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def minilm_export(tmp_path_factory, minilm_dir) -> Path:
    """all-MiniLM-L6-v2 as a SavedModel (one Matryoshka output, 128) at BASE/1."""
    from embedjax.export.saved_model import export_saved_model

    base = tmp_path_factory.mktemp("minilm_base")
    return export_saved_model(minilm_dir, base / "1", matryoshka_dims=(128,), model_name="minilm",
                              show_progress=False)


@pytest.fixture(scope="session")
def minilm_sm(minilm_export):
    from embedjax.export.saved_model import SavedModelEncoder
    return SavedModelEncoder(minilm_export)


@pytest.fixture(scope="session")
def tiny_enc(tiny_bert_dir):
    from embedjax import Encoder
    return Encoder.load(tiny_bert_dir)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tiny_enc) -> Path:
    """The tiny random BERT with prompts (query / document signatures) and Matryoshka outputs 16 and 8."""
    from embedjax.export.saved_model import export_saved_model

    return export_saved_model(tiny_enc, tmp_path_factory.mktemp("tiny_base") / "1", matryoshka_dims=(8, 16),
                              query_prompt="query: ", document_prompt="passage: ", warmup_batch_sizes=(1, 8),
                              model_name="tiny", show_progress=False)


@pytest.fixture(scope="session")
def tiny_sm(tiny_export):
    from embedjax.export.saved_model import SavedModelEncoder
    return SavedModelEncoder(tiny_export)


@pytest.fixture(scope="session")
def stsb_minilm_jax(minilm, stsb_test_sentences) -> np.ndarray:
    return minilm.encode(stsb_test_sentences, batch_size=128, show_progress=False)


@pytest.fixture(scope="session")
def stsb_minilm_saved_model(minilm_sm, stsb_test_sentences) -> np.ndarray:
    return minilm_sm.encode(stsb_test_sentences, batch_size=128, show_progress=False)


def spm_tokenizer_dir(tmp_path: Path) -> Path:
    from _spm import make_spm_tokenizer_dir

    return make_spm_tokenizer_dir(tmp_path)


@pytest.fixture(scope="session")
def t5_workdir(tmp_path_factory) -> Path:
    """A tiny Sentence-T5 (T5 encoder, mean pooling, projection to 32, normalised) trained 3 steps on SciFact
    pairs with the prompts "query: " / "passage: "; keeps checkpoints/ and final/."""
    from embedjax.config import load_config
    from embedjax.trainer import train_and_evaluate

    tmp = tmp_path_factory.mktemp("t5")
    tok = spm_tokenizer_dir(tmp)
    cfg = load_config(str(REPO / "configs" / "tiny.py"), [
        "num_steps=3", "batch_size=16", "log_every_steps=1", "max_query_length=32", "max_document_length=48",
        f"tokenizer='{tok}'", "data.query_prompt='query: '", "data.document_prompt='passage: '",
        "export_final=True"])
    cfg.model_config = {
        "architecture": "t5",
        "encoder": dict(vocab_size=1000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                        feed_forward_proj="gated-gelu"),
        "head": dict(pooling="mean", projection_dim=32, projection_bias=False, normalize=True),
        "max_length": 64,
    }
    res = train_and_evaluate(cfg, tmp / "wd")
    assert res["final_step"] == 3
    return tmp / "wd"


@pytest.fixture(scope="session")
def t5_export(t5_workdir, tmp_path_factory) -> Path:
    from embedjax.export.saved_model import export_saved_model
    return export_saved_model(t5_workdir, tmp_path_factory.mktemp("t5_base") / "1", show_progress=False)
