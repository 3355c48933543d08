"""The LLM-embedder configs' `:smoke` variants train end to end on 8 fake devices from a tiny pretrained
checkpoint written first (the pretrained path, not random init): Qwen3 (causal, last-token pooling, instruction
prompt) and Gemma 3 (switched to bidirectional attention, mean pooling), each with LoRA. The loss falls, the
checkpointed base weights are the pretrained ones, and the final model and the workdir export are the merged
model."""
import json

import numpy as np
import pytest

from embedjax.config import load_config

from _llm import write_checkpoint


def _losses(workdir):
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


@pytest.mark.parametrize("kind", ["qwen3", "gemma3"])
def test_llm_lora_smoke_trains(tmp_path, kind):
    import jax
    from flax import traverse_util

    from embedjax import Encoder
    from embedjax.export.source import load_source
    from embedjax.trainer import train_and_evaluate

    ckpt = write_checkpoint(kind, tmp_path / "pretrained")
    cfg = load_config(f"configs/{kind}_lora.py:smoke", [f"init_from='{ckpt}'", "log_every_steps=1"])
    res = train_and_evaluate(cfg, tmp_path / "wd")
    assert res["final_step"] == cfg.num_steps
    losses = _losses(tmp_path / "wd")
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses

    pre = Encoder.load(ckpt)
    final = Encoder.load(tmp_path / "wd" / "final")
    want_attention = "causal" if kind == "qwen3" else "bidirectional"
    assert final.config.encoder.attention == want_attention
    assert final.config.head.pooling == ("lasttoken" if kind == "qwen3" else "mean")
    flat_pre = traverse_util.flatten_dict(jax.tree.map(np.asarray, pre.params), sep="/")
    flat_fin = traverse_util.flatten_dict(jax.tree.map(np.asarray, final.params), sep="/")
    moved = sorted(k for k in flat_pre if not np.array_equal(flat_pre[k], flat_fin[k]))
    # only the adapted kernels changed (the adapters merged in); norms, embeddings and MLPs are the pretrained ones
    assert moved and all(k.split("/")[-2] in ("query", "key", "value", "attention_output") for k in moved), moved
    # export from the workdir's checkpoint merges the adapters too, to the same model
    src = load_source(tmp_path / "wd")
    flat_src = traverse_util.flatten_dict(jax.tree.map(np.asarray, src.params), sep="/")
    for k, v in flat_fin.items():
        np.testing.assert_allclose(flat_src[k], v, atol=1e-6)
    texts = ["a claim about cells", "protein expression increased in patients"]
    np.testing.assert_allclose(src.encoder().encode(texts), final.encode(texts), atol=1e-5)


def test_byte_level_bpe_in_the_input_pipeline_and_refused_in_graph(tmp_path):
    """A byte-level BPE tokenizer (Qwen3's kind) has no TF graph form: training runs the tokenizer itself through
    tf.py_function (ids equal the Hugging Face tokenizer's, special tokens and truncation included); export of
    such a model with the tokenizer in the graph is refused with the reason."""
    import tensorflow as tf
    from transformers import AutoTokenizer

    from embedjax.data.tf_tokenize import TFTokenizer, encode_tf, load_vocabulary

    ckpt = write_checkpoint("qwen3", tmp_path / "pretrained")
    vocab = load_vocabulary(ckpt)   # checked against the folder's tokenizer on the probe texts
    assert vocab.spec.kind == "hf" and vocab.spec.suffix_ids == (1,)
    hf = AutoTokenizer.from_pretrained(str(ckpt))
    texts = ["Instruct: find evidence\nQuery: gene expression increased", "ü é 中文 " * 20, ""]
    want = hf(texts, truncation=True, max_length=24)["input_ids"]
    got = encode_tf(vocab, tf.constant(texts), 24).to_list()
    assert [list(x) for x in want] == got
    with pytest.raises(NotImplementedError, match="BPE tokenizer has no TensorFlow graph form"):
        TFTokenizer(ckpt, 64)
