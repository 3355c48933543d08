"""`embedjax aot`: topology parsing, the abstract state equals what training builds, the estimate's argument
bytes equal what XLA compiles, TPU compile-only devices through libtpu (skipped without it), the compiler's
out-of-memory verdict, the libtpu-less fallback, and configs/sentence_t5.py."""
from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from embedjax import aot
from embedjax.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")
ST5 = str(REPO / "configs" / "sentence_t5.py")


def _has_libtpu() -> bool:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


needs_libtpu = pytest.mark.skipif(not _has_libtpu(), reason="libtpu not installed (pip install 'jax[tpu]')")


# --------------------------------------------------------------------------------------------- topologies

@pytest.mark.parametrize("name,topo,devices,wrap,cfg,hbm_gib", [
    ("v5e-256", "v5e:16x16", 256, (True, True, False), "default", 16),
    ("v5litepod-16", "v5e:4x4", 16, (False, False, False), "default", 16),
    ("v5e-128", "v5e:8x16", 128, (False, True, False), "default", 16),
    ("v4-32", "v4:2x2x4", 16, (False, False, False), "megacore", 32),
    ("v4-128", "v4:4x4x4", 64, (True, True, True), "megacore", 32),
    ("v5p-128", "v5:4x4x4", 64, (True, True, True), "megacore", 95),
    ("v6e-64", "v6e:8x8", 64, (False, False, False), "default", 32),
])
def test_parse_topology(name, topo, devices, wrap, cfg, hbm_gib):
    t = aot.parse_topology(name)
    assert (t.platform, t.topology_name, t.num_devices, t.wrap, t.chip_config_name) == ("tpu", topo, devices, wrap, cfg)
    assert t.hbm_bytes == hbm_gib * 2 ** 30
    assert aot.parse_topology(name, num_slices=2).total_devices == 2 * devices


@pytest.mark.parametrize("name,message", [
    ("v4-33", "2 per chip"), ("v5e-12", "supported v5e sizes"), ("v7-8", "unknown TPU generation"),
    ("tpu", "expected GENERATION-SIZE"),
])
def test_parse_topology_rejects(name, message):
    with pytest.raises(aot.AotError, match=message):
        aot.parse_topology(name)


# --------------------------------------------------------------------------------------------- abstract state

def test_abstract_state_matches_create_train_state():
    """What aot compiles against is what `train_and_evaluate` builds: same tree, shapes, dtypes, shardings."""
    from embedjax import sharding
    from embedjax.objectives import make_objective
    from embedjax.optim import make_optimizer
    from embedjax.train_step import abstract_train_state, create_train_state

    cfg = load_config(TINY, ["mesh.data=2", "mesh.fsdp=4"])
    model_cfg = aot.model_config_from(cfg)
    mesh = sharding.make_mesh(dict(cfg.mesh))
    _, loss_params = make_objective(cfg.loss)
    tx = make_optimizer(dict(cfg.optim), cfg.num_steps)
    state, _ = create_train_state(model_cfg, loss_params, tx, mesh, jax.random.key(0))
    abstract, _ = abstract_train_state(model_cfg, loss_params, tx, mesh)
    real_leaves, real_def = jax.tree.flatten(state)
    abs_leaves, abs_def = jax.tree.flatten(abstract)
    assert real_def == abs_def
    for r, a in zip(real_leaves, abs_leaves):
        assert (r.shape, r.dtype) == (a.shape, a.dtype)
        assert r.sharding.is_equivalent_to(a.sharding, r.ndim), (r.sharding, a.sharding)
    # FSDP really shards: a kernel's per-device bytes are a quarter of its global bytes
    assert aot.per_device_bytes(abstract.params) < aot.global_bytes(abstract.params) / 3


def test_cpu_compile_arguments_equal_the_estimate():
    """On this machine's 8 (fake) CPU devices: the compiled step's per-device argument bytes are exactly the
    estimate's params + optimizer state (+ the int32 step counter) + the batch arrays the step reads (jit drops
    the unused ones: scores, task ids ...)."""
    cfg = load_config(TINY, ["mesh.data=2", "mesh.fsdp=4"])
    r = aot.check(cfg, aot.parse_topology("cpu-8", hbm_gib=1.0), config_name="tiny")
    assert r.method == "compiled" and r.compiled is not None and r.fits
    e = r.estimate
    rows = cfg.batch_size // 8
    used_batch = 2 * rows * (cfg.max_query_length + cfg.max_document_length) * 4   # int32 ids + masks
    assert used_batch < e["batch"]
    assert r.compiled["arguments"] == e["params"] + e["opt_state"] + 4 + used_batch
    assert r.compiled["aliased"] == e["params"] + e["opt_state"] + 4          # donated state
    assert r.compiled["temporaries"] > 0 and r.peak_bytes == r.compiled["total"]
    assert r.mesh == {"data": 2, "fsdp": 4, "tensor": 1}


# --------------------------------------------------------------------------------------------- TPU (libtpu)

@needs_libtpu
def test_tpu_compile_for_a_v4_32_pod():
    cfg = load_config(ST5 + ":tiny", ["batch_size=32"])
    r = aot.check(cfg, aot.parse_topology("v4-32"), config_name="st5-tiny")
    assert r.libtpu_error is None and r.method == "compiled", r.libtpu_error
    assert r.num_hosts == 4 and r.mesh == {"data": 1, "fsdp": 16, "tensor": 1}
    assert r.fits is True and 0 < r.peak_bytes < 2 ** 30
    # TPU layouts pad small arrays, never shrink them
    assert r.compiled["arguments"] >= r.estimate["params"] + r.estimate["opt_state"] + r.estimate["batch"]
    assert "FITS" in aot.format_report(r) and "4 host(s)" in aot.format_report(r)


@needs_libtpu
def test_tpu_compiler_out_of_memory_is_a_verdict_not_a_crash():
    cfg = load_config(ST5 + ":tiny", ["batch_size=32768", "max_query_length=512", "max_document_length=512"])
    r = aot.check(cfg, aot.parse_topology("v5e-4"), config_name="st5-tiny-huge")
    assert r.fits is False and "RESOURCE_EXHAUSTED" in r.compiler_oom
    assert r.oom_required_bytes > 16 * 2 ** 30 and r.peak_bytes > r.hbm_bytes
    assert "DOES NOT FIT" in aot.format_report(r)


def test_parse_oom_bytes():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
           "(201.53G) exceeds available HBM (15.75G).")
    assert aot.parse_oom_bytes(msg) == int(201.53 * 2 ** 30)
    assert aot.parse_oom_bytes("RESOURCE_EXHAUSTED: something else") is None


# --------------------------------------------------------------------------------------------- fallback

def test_fallback_without_libtpu_records_the_error(monkeypatch):
    def no_libtpu(target):
        raise RuntimeError("JAX TPU support not installed; cannot generate TPU topology.")

    monkeypatch.setattr(aot, "target_devices", no_libtpu)
    cfg = load_config(ST5 + ":xxl,random")
    r = aot.check(cfg, aot.parse_topology("v5e-256"), config_name="st5-xxl")
    assert r.method == "estimate" and r.compiled is None
    assert r.libtpu_error == "RuntimeError: JAX TPU support not installed; cannot generate TPU topology."
    assert r.num_hosts == 64 and r.mesh == {"data": 1, "fsdp": 256, "tensor": 1}
    # the Sentence-T5-XXL encoder (T5-11B's: d_model 1024, d_ff 65536, 128 heads x 128) + 768-d projection
    D, F, HK, layers = 1024, 65536, 128 * 128, 24
    expected = 32128 * D + layers * (4 * D * HK + 2 * D * F + 2 * D) + D + 32 * 128 + D * 768
    assert r.num_params == expected
    # fp32 params sharded 256 ways (the vocabulary / norm / bias leaves not divisible stay replicated)
    assert expected * 4 / 256 <= r.estimate["params"] < expected * 4 / 256 * 1.01
    assert r.estimate["grads"] == r.estimate["params"]
    assert r.estimate["total"] == sum(v for k, v in r.estimate.items() if k != "total")
    assert "estimate only: RuntimeError" in aot.format_report(r)


def test_activation_estimate_scales_with_batch_and_grad_cache():
    from embedjax import sharding

    mesh = aot.build_mesh({"data": 1, "fsdp": -1, "tensor": 1}, [aot._ShapeOnlyDevice(i) for i in range(16)])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 16, "tensor": 1} and sharding.data_parallel_size(mesh) == 16
    def a(*o: str) -> int:
        cfg = load_config(ST5 + ":base,random", o)
        return aot.activation_estimate(aot.model_config_from(cfg), cfg, mesh)

    base = a("batch_size=512")
    assert a("batch_size=1024") == pytest.approx(2 * base, rel=1e-6)
    assert a("batch_size=512", "grad_cache_chunks=4") == pytest.approx(base / 8, rel=1e-6)  # 1 of 2 towers, 1/4
    # tensor parallelism splits heads and MLP activations (same data-parallel size: 8 x 2 vs 8 x 1 devices)
    cfg = load_config(ST5 + ":base,random")
    mc = aot.model_config_from(cfg)
    dev = [aot._ShapeOnlyDevice(i) for i in range(16)]
    tp2 = aot.activation_estimate(mc, cfg, aot.build_mesh({"data": 1, "fsdp": 8, "tensor": 2}, dev))
    tp1 = aot.activation_estimate(mc, cfg, aot.build_mesh({"data": 1, "fsdp": 8, "tensor": 1}, dev[:8]))
    assert tp2 < tp1 < 2 * tp2


def test_llm_lora_estimate(tmp_path):
    """The LLM-embedder configs from a config.json alone (no weights): GQA head sizes, remat "full" keeping one
    state per layer, LoRA's gradients being the adapters' only."""
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from aot_llm_lora import CONFIGS

    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["qwen3"]))
    over = [f"init_from='{tmp_path}'", "max_query_length=512"]
    reports = {v: aot.check(load_config("configs/qwen3_lora.py" + v, over), aot.parse_topology("v5e-16"),
                            estimate_only=True)
               for v in ("", ":full")}
    lora, full = reports[""], reports[":full"]
    assert lora.num_params == full.num_params == 596_049_920
    assert full.estimate["grads"] == full.estimate["params"]
    assert lora.estimate["grads"] < full.estimate["params"] / 20   # rank-16 adapters of the attention kernels
    assert lora.estimate["opt_state"] < full.estimate["opt_state"] / 20
    mesh = aot.build_mesh({"data": 4, "fsdp": 4, "tensor": 1}, [aot._ShapeOnlyDevice(i) for i in range(16)])
    cfg = load_config("configs/qwen3_lora.py", over)
    mc = aot.model_config_from(cfg)
    remat = aot.activation_estimate(mc, cfg, mesh)
    cfg_none = load_config("configs/qwen3_lora.py", over + ["remat_policy='none'"])
    none = aot.activation_estimate(aot.model_config_from(cfg_none), cfg_none, mesh)
    assert none > 10 * remat


def test_cli_estimate_only_exit_status_and_json(tmp_path, capsys):
    from embedjax.cli import main

    out = tmp_path / "r.json"
    rc = main(["aot", "--config", TINY, "--topology", "cpu-8", "--estimate-only", "--hbm-gib", "0.001",
               "--set", "batch_size=64", "--json", str(out)])
    assert rc == 1
    text = capsys.readouterr().out
    assert "DOES NOT FIT" in text and "global batch 64" in text
    rep = json.loads(out.read_text())
    assert rep["fits"] is False and rep["method"] == "estimate" and rep["batch_size"] == 64
    assert main(["aot", "--config", TINY, "--topology", "cpu-8", "--estimate-only", "--hbm-gib", "1"]) == 0


def test_cli_bad_topology_is_one_line(capsys):
    from embedjax.cli import main

    assert main(["aot", "--config", TINY, "--topology", "v9-8"]) == 2
    err = capsys.readouterr().err
    assert "unknown TPU generation 'v9'" in err and len(err.strip().splitlines()) == 1


def test_batch_not_divisible_by_the_data_devices():
    with pytest.raises(aot.AotError, match="batch_size 24 is not divisible by the 16"):
        aot.check(load_config(ST5 + ":tiny", ["batch_size=24"]), aot.parse_topology("v4-32"), estimate_only=True)


# --------------------------------------------------------------------------------------------- the config

@pytest.mark.parametrize("variant", ["tiny", "base,random", "large,random", "xl,random", "xxl,random", "xxl,v1_1",
                                     "base,pretrained", "base", "xxl"])
def test_sentence_t5_variants_load(variant):
    cfg = load_config(f"{ST5}:{variant}")
    assert cfg.loss.temperature == 0.01 and cfg.loss.bidirectional and cfg.loss.name == "in_batch_softmax"
    assert cfg.mesh.fsdp == -1
    if "pretrained" in variant:
        assert cfg.init_from == "sentence-transformers/sentence-t5-base"
        return
    head = cfg.model_config.head
    if variant in ("base", "xxl"):     # the paper's start: the pretrained T5 v1.0 encoder, a new projection
        assert cfg.init_from == {"base": "google-t5/t5-base", "xxl": "google-t5/t5-11b"}[variant]
        assert head.projection_dim == 768 and "encoder" not in cfg.model_config
        return
    assert head.pooling == "mean" and head.projection_bias is False and head.normalize is True
    assert head.projection_dim == (32 if variant == "tiny" else 768)
    enc = cfg.model_config.encoder
    assert enc.feed_forward_proj == ("gated-gelu" if "v1_1" in variant else "relu")


def test_sentence_t5_bad_variant():
    with pytest.raises(ValueError, match="expected one size of tiny, base, large, xl, xxl"):
        load_config(f"{ST5}:huge")


def test_estimate_matches_the_model_size_ladder():
    """Parameter counts of the four sizes grow as the published ones do (110M, 335M, 1.24B, 4.87B)."""
    counts = []
    for size in ("base", "large", "xl", "xxl"):
        r = aot.check(load_config(f"{ST5}:{size},random"), aot.parse_topology("v5e-256"), estimate_only=True)
        counts.append(r.num_params)
    published = [110e6, 335e6, 1.24e9, 4.87e9]
    for got, want in zip(counts, published):
        assert math.isclose(got, want, rel_tol=0.03), (got, want)
    assert np.all(np.diff(counts) > 0)
