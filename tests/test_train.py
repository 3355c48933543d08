"""End to end: train_and_evaluate on 8 fake devices (tiny configs)."""
import json

import numpy as np
import pytest

pytest.importorskip("seqio")

from embedjax.config import load_config  # noqa: E402


def _losses(workdir):
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"], r["train/accuracy"]) for r in rows if "train/loss" in r]


def test_tiny_config_trains_and_loss_falls(tmp_path):
    from embedjax.trainer import train_and_evaluate

    cfg = load_config("configs/tiny.py", ["num_steps=20", "log_every_steps=1"])
    res = train_and_evaluate(cfg, tmp_path)
    assert res["final_step"] == 20
    hist = _losses(tmp_path)
    first, last = np.mean([l for _, l, _ in hist[:3]]), np.mean([l for _, l, _ in hist[-3:]])
    assert last < first - 0.1, hist
    assert (tmp_path / "checkpoints").is_dir() and (tmp_path / "tensorboard").is_dir()


@pytest.mark.slow
def test_tiny_sentence_t5_from_scratch(tmp_path):
    """T5 encoder + mean pooling + projection + normalisation, SentencePiece vocab trained here, in-batch softmax
    over a global batch of 32 on 8 fake devices: loss falls and accuracy rises well above chance (1/32)."""
    from embedjax.trainer import train_and_evaluate

    from _spm import make_spm_tokenizer_dir

    tok = make_spm_tokenizer_dir(tmp_path)
    cfg = load_config("configs/tiny.py", [
        "num_steps=60", "batch_size=32", "log_every_steps=1", "optim.lr=3e-3", "optim.warmup_steps=5",
        "max_query_length=32", "max_document_length=48", f"tokenizer='{tok}'"])
    cfg.model_config = {
        "architecture": "t5",
        "encoder": dict(vocab_size=1000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                        feed_forward_proj="gated-gelu"),
        "head": dict(pooling="mean", projection_dim=32, projection_bias=False, normalize=True),
        "max_length": 64,
    }
    res = train_and_evaluate(cfg, tmp_path / "wd")
    hist = _losses(tmp_path / "wd")
    first_loss = np.mean([l for _, l, _ in hist[:3]])
    last_loss = np.mean([l for _, l, _ in hist[-5:]])
    last_acc = np.mean([a for _, _, a in hist[-5:]])
    assert last_loss < 0.6 * first_loss, hist
    assert last_acc > 10 / 32, hist        # chance is 1/32
    assert res["final_step"] == 60


def test_divergence_stops_with_step_and_checkpoint(tmp_path):
    """A run that blows up stops with the step number and where the last good checkpoint is."""
    from embedjax.trainer import TrainingDiverged, train_and_evaluate

    cfg = load_config("configs/tiny.py", ["num_steps=8", "optim.lr=1e30", "optim.warmup_steps=0",
                                          "optim.clip_norm=0", "checkpoint_every_steps=1"])
    with pytest.raises(TrainingDiverged, match=r"step \d+: non-finite .*last good checkpoint"):
        train_and_evaluate(cfg, tmp_path)
