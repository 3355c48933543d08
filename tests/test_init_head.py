"""`init_from` a plain encoder checkpoint plus `model_config` gives it a new head: Sentence-T5's projection on a
T5 checkpoint trains and the saved model reloads with the head; separate towers start from the one pretrained
tower; what cannot be changed on a checkpoint is a one-line config error."""
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("seqio")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from embedjax.config import ConfigError, load_config  # noqa: E402

ST5_HEAD = {"head": {"pooling": "mean", "projection_dim": 16, "projection_bias": False, "normalize": True}}


def _plain_t5(tmp_path):
    """A Hugging Face T5 encoder folder as t5-base ships (no sentence-transformers modules, no head)."""
    from _spm import make_spm_tokenizer_dir

    tok = make_spm_tokenizer_dir(tmp_path)
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                feed_forward_proj="relu", dropout_rate=0.0)
    folder = tmp_path / "t5"
    transformers.T5EncoderModel(cfg).save_pretrained(folder)
    for f in tok.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


@pytest.mark.slow
def test_t5_checkpoint_with_sentence_t5_head_trains_and_reloads(tmp_path):
    from embedjax import Encoder
    from embedjax.models.convert import load_folder
    from embedjax.trainer import train_and_evaluate

    folder = _plain_t5(tmp_path)
    cfg = load_config("configs/tiny.py", ["num_steps=2", "log_every_steps=1", "eval.before=False",
                                          "export_final=True", f"init_from='{folder}'", "batch_size=16"])
    cfg.model_config = ST5_HEAD
    res = train_and_evaluate(cfg, tmp_path / "run")
    assert res["final_step"] == 2 and np.isfinite(res["last_train_metrics"]["loss"])
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["model_config"] == ST5_HEAD and recorded["init_from"] == str(folder)
    enc = Encoder.load(res["final_model"])
    assert enc.config.architecture == "t5" and enc.config.head.projection_dim == 16
    assert not enc.config.head.projection_bias and enc.config.head.normalize
    # the encoder is the pretrained T5's, trained two steps; the projection is the trained new one
    pre = load_folder(folder)[1]["tower"]["encoder"]
    state = res["state"].params["model"]["tower"]
    assert set(state) == {"encoder", "projection"}
    w = np.asarray(state["encoder"]["token_embedder"]["embedding"])
    assert 0 < np.abs(w - pre["token_embedder"]["embedding"]).max() < 0.1
    np.testing.assert_allclose(enc.params["tower"]["projection"]["kernel"], state["projection"]["kernel"])
    out = enc.encode(["a claim about cells", "another"])
    assert out.shape == (2, 16) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)


def test_separate_towers_start_from_the_one_pretrained_tower(tiny_bert_dir):
    import jax

    from embedjax import sharding
    from embedjax.experiment import assemble
    from embedjax.models.convert import load_folder
    from embedjax.models.source import resolve

    cfg = load_config("configs/tiny.py", [f"init_from='{tiny_bert_dir}'"])
    cfg.model_config = {"shared_towers": False, "head": {"projection_dim": 8, "normalize": True}}
    src = resolve(cfg)
    assert not src.config.shared_towers and src.config.head.projection_dim == 8
    assert src.config.head.pooling == "mean"            # what the folder had, unless model_config changes it
    exp = assemble(cfg, sharding.make_mesh({"data": -1}))
    state, _ = exp.create_state(src.config, jax.random.key(0), pretrained=src.params)
    pre = load_folder(tiny_bert_dir)[1]["tower"]["encoder"]
    model = state.params["model"]
    for tower in ("query_tower", "document_tower"):
        for a, b in zip(jax.tree.leaves(model[tower]["encoder"]), jax.tree.leaves(pre)):
            np.testing.assert_array_equal(np.asarray(a), b)
        assert model[tower]["projection"]["kernel"].shape == (32, 8)
    # the two new projections are initialised, not copies of one another or zeros
    q, d = (np.asarray(model[t]["projection"]["kernel"]) for t in ("query_tower", "document_tower"))
    assert np.abs(q).max() > 0 and np.abs(d).max() > 0
    # every weight sits on the mesh sharded as the rules say: no weight was placed whole on one device first
    emb = model["query_tower"]["encoder"]["word_embeddings"]["embedding"]
    assert len(emb.sharding.device_set) == 8


@pytest.mark.parametrize("model_config,message", [
    ({"encoder": {"num_layers": 2}}, "model_config.encoder.num_layers cannot be set with init_from"),
    ({"head": {"pooling": "weighted"}}, "model_config.head: pooling 'weighted' is not supported"),
    ({"head": {"projection": 8}}, "model_config.head.projection is not a head setting"),
])
def test_what_a_checkpoint_defines_cannot_be_overridden(tiny_bert_dir, model_config, message):
    from embedjax.models.source import resolve

    cfg = load_config("configs/tiny.py", [f"init_from='{tiny_bert_dir}'"])
    cfg.model_config = model_config
    with pytest.raises(ConfigError, match=message):
        resolve(cfg, weights=False)


def test_pretrained_weights_are_read_slice_by_slice_onto_the_mesh(tiny_bert_dir):
    """Training's loading path: every weight is a LazyWeight, and each device's part is read from the file into
    the sharded array (fsdp over 8 devices): no device holds a whole weight, the values are the file's."""
    import jax

    from embedjax import sharding
    from embedjax.experiment import assemble
    from embedjax.models.convert import LazyWeight, load_folder
    from embedjax.models.source import resolve

    cfg = load_config("configs/tiny.py", [f"init_from='{tiny_bert_dir}'", "mesh.data=1", "mesh.fsdp=8"])
    cfg.model_config = {}
    src = resolve(cfg)
    assert all(isinstance(x, LazyWeight) for x in jax.tree.leaves(src.params["tower"]["encoder"]))
    exp = assemble(cfg, sharding.make_mesh(dict(cfg.mesh)))
    state, _ = exp.create_state(src.config, jax.random.key(0), pretrained=src.params)
    eager = load_folder(tiny_bert_dir)[1]
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(state.params["model"])[0],
                                 jax.tree.leaves(eager)):
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=jax.tree_util.keystr(path))
        if got.ndim == 2 and got.shape[1] % 8 == 0 or got.ndim == 2 and got.shape[0] % 8 == 0:
            assert got.addressable_shards[0].data.size < got.size, jax.tree_util.keystr(path)
    emb = state.params["model"]["tower"]["encoder"]["word_embeddings"]["embedding"]
    assert emb.addressable_shards[0].data.shape == (emb.shape[0], emb.shape[1] // 8)


def test_lazy_weight_slices_of_fused_and_transposed_weights(tmp_path):
    """ModernBERT's fused Wqkv / Wi split into parts and transposed: any slice read lazily equals the same slice
    of the eagerly loaded array."""
    import jax

    from embedjax.models.convert import load_folder

    cfg = transformers.ModernBertConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=2, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                        cls_token_id=0, sep_token_id=2)
    torch.manual_seed(0)
    transformers.ModernBertModel(cfg).save_pretrained(tmp_path)
    lazy, eager = load_folder(tmp_path, lazy=True)[1], load_folder(tmp_path)[1]
    rng = np.random.default_rng(0)
    for (path, lw), want in zip(jax.tree_util.tree_flatten_with_path(lazy)[0], jax.tree.leaves(eager)):
        assert lw.shape == want.shape, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(lw), want)
        idx = tuple(slice(int(a), int(a) + max(1, int(n) // 2)) for n in want.shape
                    for a in [rng.integers(0, max(1, n // 2))])
        np.testing.assert_array_equal(lw.read(idx), want[idx], err_msg=jax.tree_util.keystr(path))
