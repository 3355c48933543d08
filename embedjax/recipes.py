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


def llm_lora_config(c, variant: str | None, name: str):
    """The training settings the LLM-embedder configs share (configs/qwen3_lora.py, configs/gemma3_lora.py), on
    `c` (which already names the model, head and prompts): the shipped SciFact train pairs, 128 / 512 tokens,
    batch 1024, bfloat16 compute with per-layer rematerialisation, in-batch softmax at temperature 0.02, rank-16
    LoRA (alpha 32) on the attention projections, data x fsdp(4). Variants: None; "full" (no LoRA, lr 1e-5);
    "smoke" (the same architecture at tiny size, 8 fake devices, from `--config.init_from=PATH`)."""
    from embedjax.data.sources import shipped_path

    c.data.kind = "beir"
    c.data.path = str(shipped_path("scifact"))
    c.data.split = "train"
    c.max_query_length = 128
    c.max_document_length = 512
    c.batch_size = 1024
    c.num_steps = 1000
    c.dtype = "bfloat16"
    c.remat_policy = "full"
    c.loss.name = "in_batch_softmax"
    c.loss.temperature = 0.02
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.0
    c.mesh.data, c.mesh.fsdp = -1, 4
    c.eval.tasks = (f"beir:{shipped_path('scifact')}:test",)
    c.eval.batch_size = 64
    if variant == "full":
        c.lora.rank = 0
        c.optim.lr = 1e-5
    elif variant == "smoke":
        c.init_from = ""                   # required: --config.init_from=PATH of a tiny checkpoint
        c.max_query_length = 64
        c.max_document_length = 64
        c.batch_size = 16
        c.num_steps = 20
        c.dtype = "float32"
        c.remat_policy = "none"
        c.loss.temperature = 0.05
        c.optim.lr = 2e-2
        c.optim.warmup_steps = 2
        c.mesh.data, c.mesh.fsdp = 2, 4
        c.eval.tasks = ()
    elif variant:
        raise ValueError(f"configs/{name}: unknown variant {variant!r} (none, full, smoke)")
    return c


def smoke_training(c, *, lr: float, mesh: tuple[int, int]):
    """The short run a recipe's `:smoke` variants share (tests/test_recipes.py): 12 steps of 16 pairs on 8 fake
    devices as (data, fsdp) = `mesh`, a 2-step warm-up to `lr`, every step logged, the final model saved."""
    c.batch_size = 16
    c.num_steps = 12
    c.optim.lr = lr
    c.optim.warmup_steps = 2
    c.mesh.data, c.mesh.fsdp = mesh
    c.log_every_steps = 1
    c.export_final = True
    return c


def stage_variant(config: str, arg: str | None) -> tuple[bool, str]:
    """(smoke, stage) of a two-stage recipe's variant: pre | ft (default) | smoke_pre | smoke_ft."""
    variant = arg or "ft"
    if variant not in ("pre", "ft", "smoke_pre", "smoke_ft"):
        raise ValueError(f"configs/{config}: unknown variant {variant!r} (pre, ft, smoke_pre, smoke_ft)")
    return variant.startswith("smoke"), variant.removeprefix("smoke_")

