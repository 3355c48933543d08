"""Models keep [B, L, D] activations sharded over the batch axes under a mesh (what made Sentence-T5-XXL fit on
v5e-256 in the AOT check: 201.5 GB -> 13.6 GiB per chip), and are unchanged without one."""
import jax
import jax.numpy as jnp

from embedjax import sharding
from embedjax.models.bert import BertConfig
from embedjax.models.dual_encoder import DualEncoder, HeadConfig, ModelConfig, init_params

CFG = ModelConfig("bert", BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32), HeadConfig(pooling="mean"), max_length=16)


def _constraints(batch: int, mesh_shape: dict | None) -> int:
    params = init_params(CFG, jax.random.key(0))
    ids = jnp.ones((batch, 8), jnp.int32)
    f = lambda p: DualEncoder(CFG).apply({"params": p}, ids, jnp.ones_like(ids))  # noqa: E731
    if mesh_shape is None:
        jaxpr = jax.make_jaxpr(f)(params)
    else:
        with jax.set_mesh(sharding.make_mesh(mesh_shape)):
            jaxpr = jax.make_jaxpr(f)(params)
    return str(jaxpr).count("sharding_constraint")


def test_constrained_under_a_mesh_only():
    assert _constraints(8, {"data": 4, "fsdp": 2}) == 3          # embeddings + 2 layers
    assert _constraints(8, None) == 0
    assert _constraints(6, {"data": 4, "fsdp": 2}) == 0          # batch does not divide: left to XLA
    assert _constraints(8, {"data": 1, "fsdp": 1, "tensor": 8}) == 0   # no data parallelism
