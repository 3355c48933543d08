"""CPU attention in row blocks (`masked_attention(row_blocks=...)`) computes the same values and gradients as the
one fused call, with padding, a relative-position bias and a local window, and keeps each device's rows on that
device when the batch is sharded."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedjax import sharding
from embedjax.models import layers
from embedjax.models.layers import _attention_row_blocks, masked_attention

B, L, H, K = 8, 24, 3, 4


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((B, L, H, K)), jnp.float32) for _ in range(3))
    lengths = rng.integers(3, L + 1, B)
    mask = jnp.asarray((np.arange(L)[None] < lengths[:, None]).astype(np.int32))
    bias = jnp.asarray(rng.standard_normal((1, H, L, L)), jnp.float32)
    return q, k, v, mask, bias


@pytest.mark.parametrize("kw", [dict(scale=0.5), dict(scale=None, bias=True), dict(scale=0.5, window=4)],
                         ids=["plain", "bias", "window"])
def test_row_blocks_equal_the_fused_call(kw, monkeypatch):
    monkeypatch.setattr(layers, "CPU_ATTENTION_BLOCK_BYTES", 2 * H * L * L * 4)   # two rows a block
    assert _attention_row_blocks(B, H, L) == B // 2
    q, k, v, mask, bias = _inputs()
    kw = dict(kw)
    if kw.pop("bias", False):
        kw["bias_1xHxLxL"] = bias

    def loss(q, k, v, blocks):
        out = masked_attention(q, k, v, mask, row_blocks=blocks, **kw)
        return jnp.sum(out * jnp.sin(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))), out

    (l0, o0), g0 = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, False)
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
    (l1, o1), g1 = fn(q, k, v, True)
    assert "while" in fn.lower(q, k, v, True).as_text()       # the blocked form really ran
    np.testing.assert_allclose(o1, o0, atol=1e-6)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # the default on this (CPU) backend is the blocked form
    np.testing.assert_allclose(masked_attention(q, k, v, mask, **kw), o0, atol=1e-6)


def test_small_logits_stay_one_call():
    assert _attention_row_blocks(2, 2, 8) == 1


def test_blocks_keep_rows_on_their_device(monkeypatch):
    """Under a data-parallel mesh each block takes whole rows from every device: the compiled program moves no
    activations between devices (no all-gather / all-to-all / collective-permute)."""
    monkeypatch.setattr(layers, "CPU_ATTENTION_BLOCK_BYTES", H * L * L * 4)   # one row per device a block
    q, k, v, mask, _ = _inputs(1)
    mesh = sharding.make_mesh({"data": 4, "fsdp": 1, "tensor": 1}, jax.devices()[:4])
    with jax.set_mesh(mesh):
        assert sharding.activation_batch_shards(B) == 4
        assert _attention_row_blocks(B, H, L) == 2            # 2 local rows per device, one per block
        put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))  # noqa: E731
        fn = jax.jit(lambda q, k, v, m: masked_attention(q, k, v, m, scale=0.5))
        args = [put(x) for x in (q, k, v, mask)]
        hlo = fn.lower(*args).compile().as_text()
        out = fn(*args)
    for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
        assert op not in hlo, op
    np.testing.assert_allclose(out, masked_attention(q, k, v, mask, scale=0.5, row_blocks=False), atol=1e-6)


def test_cpu_compiler_options_reach_the_encoder(tiny_bert_dir, monkeypatch):
    """On CPU, `Encoder.encode`'s forward pass is compiled with `layers.CPU_XLA_OPTIONS` (no YNNPACK fusions);
    switched off, XLA's default fusions come back; a TPU device gets no CPU flags (its compiler would refuse
    them)."""
    from embedjax import Encoder

    def compiled(enc):
        ids, mask = enc._text.pad(enc._text.tokenize(["a short text", "another one"], 16).ids, 16, 2)
        return enc._apply.lower(enc.params, ids, mask, tower="query", normalize=True).compile().as_text()

    assert layers.compiler_options() == layers.CPU_XLA_OPTIONS
    assert "__ynn_fusion" not in compiled(Encoder.load(tiny_bert_dir))
    monkeypatch.setattr(layers, "CPU_XLA_OPTIONS_ENABLED", False)
    assert layers.compiler_options() is None
    assert "__ynn_fusion" in compiled(Encoder.load(tiny_bert_dir))

    class Tpu:
        platform = "tpu"
    monkeypatch.setattr(layers, "CPU_XLA_OPTIONS_ENABLED", True)
    assert layers.compiler_options([Tpu()]) is None
