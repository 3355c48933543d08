"""Shared pieces of the recipe configs (configs/*.py). A config may import from the package only, never from a
sibling file: `tpu/run.sh` ships the one config file to the workers, where the package is installed."""
from __future__ import annotations

T5_SIZES = {   # T5 v1.1 encoders (d_model, d_kv, d_ff, layers, heads)
    "tiny": (64, 16, 128, 2, 4),
    "base": (768, 64, 2048, 12, 12),
    "large": (1024, 64, 2816, 24, 16),
    "xl": (2048, 64, 5120, 24, 32),
    "xxl": (4096, 64, 10240, 24, 64),
}


def t5_model_config(size: str, projection_dim: int = 768) -> dict:
    """A T5 v1.1 encoder of a published size (gated GELU), mean pooling, bias-free projection, L2 norm: the
    Sentence-T5 / GTR / Gecko-like dual encoder built from scratch (`model_config`)."""
    if size not in T5_SIZES:
        raise ValueError(f"T5 size {size!r} is not one of {', '.join(T5_SIZES)}")
    d, kv, ff, layers, heads = T5_SIZES[size]
    return {"architecture": "t5",
            "encoder": dict(vocab_size=32128, d_model=d, d_kv=kv, d_ff=ff, num_layers=layers, num_heads=heads,
                            feed_forward_proj="gated-gelu"),
            "head": dict(pooling="mean", projection_dim=projection_dim, projection_bias=False, normalize=True),
            "max_length": 512}
