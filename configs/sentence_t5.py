"""Sentence-T5 dual encoders (Ni et al. 2021): a T5 encoder, mean pooling, a 768-d projection without bias,
L2 normalisation, bidirectional in-batch softmax at temperature 0.01, parameters sharded with FSDP.

Check that a size fits a pod slice before renting it (compiles on this CPU machine, see `embedjax aot --help`):

    embedjax aot --config configs/sentence_t5.py:xxl,random --topology v5e-256

Train on a TPU slice (every worker runs the same command, see tpu/README section in the top-level README):

    embedjax train --config configs/sentence_t5.py:base --workdir gs://BUCKET/runs/st5_base \\
        --config.data.kind=pairs --config.data.path=/data/pairs.jsonl

Data: ``{"query", "positive"}`` JSONL pairs (the paper trains on community QA pairs, then on NLI); without the
overrides it trains on the shipped SciFact train split, a smoke test only. The full sizes were not trained here
(data and TPU time not available on the development machine).

Result (`embedjax aot ... --topology v5e-256`, libtpu 0.0.42.1, compiled on a 2-core CPU, per chip of 16 GiB):
  size   batch  peak per chip
  base    512   0.73 GiB (re-measured 2026-12-03: 0.725 GiB, 176 s to compile)
  large  1024   2.42 GiB
  xl     2048   7.49 GiB
  xxl    2048   13.64 GiB (85%; grad_cache_chunks=4)
XXL with rematerialisation and scanned layers (`python bench/aot_remat_scan.py`, 2026-12-03): remat_policy=full
7.43 GiB; scan_layers=True 4.51 GiB and 4.8x less compile time; both 1.24 GiB.

Smoke run (tests/test_recipes.py, 8 fake CPU devices): the same architecture at tiny size from a tiny
pretrained T5 v1.0 folder (any Hugging Face T5 folder with its SentencePiece tokenizer), 12 steps on the
shipped SciFact train pairs; the loss falls (6.5 -> 2.7 on the test's checkpoint):

    embedjax train --config configs/sentence_t5.py:smoke --workdir /tmp/st5_smoke --config.init_from=PATH

Variants (comma-separated, big_vision style), e.g. `:xxl`, `:xxl,random`, `:base,pretrained`, `:tiny`, `:smoke`:
  tiny | base | large | xl | xxl   size. base/large/xl/xxl have exactly the encoder shapes of
                                   `sentence-transformers/sentence-t5-{base,large,xl,xxl}` (T5 v1.0: ReLU MLP;
                                   xl = the T5-3B encoder, xxl = the T5-11B encoder); tiny is for tests.
  (no flag)                        the paper's start: init_from the pretrained T5 v1.0 checkpoint of that size
                                   (google-t5/t5-base, -large, -3b, -11b; the encoder, plus a new 768-d
                                   projection); `embedjax aot` reads only its config.json.
  random                           the same architecture built from `model_config`, randomly initialised;
                                   nothing is downloaded but the tokenizer (offline AOT checks, benchmarks).
  v1_1                             T5 v1.1 shapes, random init (GTR's start is configs/gtr.py).
  pretrained                       init_from the finished sentence-transformers/sentence-t5-SIZE model.
  smoke                            alone: tiny lengths, batch 16, 12 steps on (data 2, fsdp 4), a new 32-d
                                   projection on the T5 v1.0 checkpoint `--config.init_from=PATH` (required).
"""
from embedjax.config import base_config
from embedjax.data.sources import shipped_path
from embedjax.recipes import smoke_training

# (d_model, d_ff, num_heads, d_kv, num_layers): the encoders of the published Sentence-T5 checkpoints (T5 v1.0).
_T5_V1_0 = {
    "base": (768, 3072, 12, 64, 12),
    "large": (1024, 4096, 16, 64, 24),
    "xl": (1024, 16384, 32, 128, 24),
    "xxl": (1024, 65536, 128, 128, 24),
}
# T5 v1.1 (gated GELU, no tied embeddings).
_T5_V1_1 = {
    "base": (768, 2048, 12, 64, 12),
    "large": (1024, 2816, 16, 64, 24),
    "xl": (2048, 5120, 32, 64, 24),
    "xxl": (4096, 10240, 64, 64, 24),
}
_TINY = (32, 64, 4, 8, 2)
_SIZES = ("tiny", "base", "large", "xl", "xxl", "smoke")
_FLAGS = ("v1_1", "pretrained", "random")
# The pretrained T5 v1.0 checkpoints the paper starts from (encoder only is used), per size.
_T5_HUB = {"base": "google-t5/t5-base", "large": "google-t5/t5-large", "xl": "google-t5/t5-3b",
           "xxl": "google-t5/t5-11b"}

# Global batch, (data, fsdp, tensor) mesh and gradient-cache chunks per size, checked with `embedjax aot` on a
# v5e-256 slice (see the table above); for smaller slices lower batch_size or raise grad_cache_chunks, and check
# again with `embedjax aot --topology v5e-16 --set batch_size=...`.
_TRAINING = {
    "tiny": dict(batch_size=16, mesh=dict(data=1, fsdp=-1, tensor=1), grad_cache_chunks=0),
    "base": dict(batch_size=512, mesh=dict(data=1, fsdp=-1, tensor=1), grad_cache_chunks=0),
    "large": dict(batch_size=1024, mesh=dict(data=1, fsdp=-1, tensor=1), grad_cache_chunks=0),
    "xl": dict(batch_size=2048, mesh=dict(data=1, fsdp=-1, tensor=1), grad_cache_chunks=0),
    "xxl": dict(batch_size=2048, mesh=dict(data=1, fsdp=-1, tensor=1), grad_cache_chunks=4),
}


def _parse(arg):
    tokens = [t.strip() for t in (arg or "base").split(",") if t.strip()]
    sizes = [t for t in tokens if t in _SIZES]
    unknown = [t for t in tokens if t not in _SIZES and t not in _FLAGS]
    if unknown or len(sizes) != 1:
        raise ValueError(f"configs/sentence_t5.py: variant {arg!r}: expected one size of {', '.join(_SIZES)} "
                         f"plus optional {', '.join(_FLAGS)}" + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    if sizes == ["smoke"] and len(tokens) > 1:
        raise ValueError(f"configs/sentence_t5.py: variant {arg!r}: 'smoke' takes no other token (it starts from "
                         "the T5 v1.0 checkpoint given by --config.init_from=PATH)")
    if "pretrained" in tokens and "random" in tokens:
        raise ValueError(f"configs/sentence_t5.py: variant {arg!r}: 'pretrained' and 'random' exclude each other")
    return sizes[0], "v1_1" in tokens, "pretrained" in tokens, "random" in tokens


def get_config(arg=None):
    size, v1_1, pretrained, random_init = _parse(arg)
    if size == "smoke":
        return _smoke()
    if size == "tiny":
        d_model, d_ff, heads, d_kv, layers = _TINY
    else:
        d_model, d_ff, heads, d_kv, layers = (_T5_V1_1 if v1_1 else _T5_V1_0)[size]
    c = base_config()
    hub_id = f"sentence-transformers/sentence-t5-{size}"
    if pretrained:
        if size == "tiny" or v1_1:
            raise ValueError(f"configs/sentence_t5.py: variant {arg!r}: 'pretrained' needs one of base, large, "
                             "xl, xxl without v1_1 (the published Sentence-T5 checkpoints)")
        c.init_from = hub_id
    elif size != "tiny" and not v1_1 and not random_init:
        # the paper's start: the pretrained T5 v1.0 encoder, a new 768-d bias-free projection
        c.init_from = _T5_HUB[size]
        c.model_config = {"head": dict(pooling="mean", projection_dim=768, projection_bias=False, normalize=True),
                          "max_length": 256}
    else:
        c.model_config = {
            "architecture": "t5",
            "encoder": dict(vocab_size=32128, d_model=d_model, d_ff=d_ff, num_heads=heads, d_kv=d_kv,
                            num_layers=layers, feed_forward_proj="gated-gelu" if v1_1 else "relu"),
            "head": dict(pooling="mean", projection_dim=32 if size == "tiny" else 768, projection_bias=False,
                         normalize=True),
            "max_length": 256,
        }
        # The T5 SentencePiece vocabulary (32k pieces, same for every size); downloaded once at train time.
        c.tokenizer = "sentence-transformers/sentence-t5-base"
    c.dtype = "float32" if size == "tiny" else "bfloat16"   # compute dtype (parameters, optimizer: float32)
    c.max_query_length = 128
    c.max_document_length = 128
    c.data.kind = "beir"
    c.data.path = str(shipped_path("scifact"))   # replace with your pairs: data.kind=pairs data.path=FILE
    c.data.split = "train"
    t = _TRAINING[size]
    c.batch_size = t["batch_size"]
    c.mesh = dict(t["mesh"])
    c.grad_cache_chunks = t["grad_cache_chunks"]
    c.num_steps = 20_000
    c.loss.name = "in_batch_softmax"
    c.loss.temperature = 0.01
    c.loss.bidirectional = True
    c.optim.name = "adafactor"          # as T5: factored second moments keep optimizer state small
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 1_000
    c.optim.decay = "linear"
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0
    c.log_every_steps = 50
    c.checkpoint_every_steps = 500
    c.eval.tasks = (f"beir:{shipped_path('scifact')}:test",)
    c.eval.every_steps = 2_000
    if size == "tiny":
        c.max_query_length = 32
        c.max_document_length = 64
        c.num_steps = 4
        c.optim.warmup_steps = 1
        c.log_every_steps = 1
        c.checkpoint_every_steps = 0
        c.eval.tasks = ()
        c.export_final = False
    return c


def _smoke():
    """The recipe at tiny size from a tiny pretrained T5 v1.0 checkpoint (`--config.init_from=PATH`, required):
    the checkpoint's encoder, a new bias-free 32-d projection, Adafactor, bidirectional in-batch softmax, the
    shipped SciFact train pairs, 8 fake devices as (data 2, fsdp 4) (tests/test_recipes.py)."""
    c = get_config("tiny")
    c.init_from = ""                     # required: --config.init_from=PATH
    c.model_config = {"head": dict(pooling="mean", projection_dim=32, projection_bias=False, normalize=True)}
    c.tokenizer = ""                     # the checkpoint's
    return smoke_training(c, lr=1e-2, mesh=(2, 4))
