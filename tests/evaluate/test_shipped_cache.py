"""The shipped corpus embeddings of the README main job's pretrained model (embedjax/data/shipped/
corpus_embeddings) are what that model computes: the main job's evaluation before training finds them under its
own cache key, and sampled rows equal fresh encodings."""
from pathlib import Path

import numpy as np
import pytest

from embedjax.config import load_config
from embedjax.evaluate import encode_fn_from_encoder
from embedjax.evaluate.retrieval import SHIPPED_CACHE_DIR, _open_cached
from embedjax.evaluate.ship_cache import _NoWriter, pretrained_encoder
from embedjax.trainer import _evaluation

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    config = load_config(str(ROOT / "configs" / "minilm_scifact.py"))
    encoder = pretrained_encoder(config)
    evaluate = _evaluation(config, encoder, _NoWriter())
    (name, ev), = evaluate.evaluators.items()
    ev.use_cache = True                   # what the trainer sets for the evaluation before training
    ev.cache_dir = tmp_path_factory.mktemp("empty_cache")
    return config, encoder, ev


def test_main_job_finds_the_shipped_embeddings(main_job):
    config, encoder, ev = main_job
    fn = encode_fn_from_encoder(encoder, batch_size=config.eval.batch_size)
    path = ev.cache_path(fn)
    shipped = SHIPPED_CACHE_DIR / path.name
    assert shipped.is_file(), (f"{shipped} missing: configs/minilm_scifact.py or the model changed; run "
                               "python -m embedjax.evaluate.ship_cache --config configs/minilm_scifact.py")
    texts = ev.document_texts()
    opened = _open_cached(shipped, len(texts))
    assert opened is not None
    f, dim = opened
    with f:
        emb = np.fromfile(f, dtype="<f4").reshape(len(texts), dim)
    # rows are stored longest text first (the evaluator's order); check the 8 shortest and 8 spread out
    lengths = np.array([len(t) for t in texts])
    order = np.argsort(-lengths, kind="stable")
    rows = np.concatenate([np.arange(len(texts) - 8, len(texts)), np.linspace(0, len(texts) - 9, 8).astype(int)])
    fresh = fn([texts[order[r]] for r in rows], "document")
    np.testing.assert_allclose(emb[rows], fresh, atol=2e-5)


def test_a_changed_model_does_not_use_them(main_job):
    config, encoder, ev = main_job
    from embedjax.encoder import Encoder
    import jax

    other = Encoder(encoder.config, jax.tree.map(lambda x: x * 1.0001, encoder.params), encoder.tokenizer)
    path = ev.cache_path(encode_fn_from_encoder(other, batch_size=config.eval.batch_size))
    assert not (SHIPPED_CACHE_DIR / path.name).exists()
