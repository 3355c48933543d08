"""Tests for embedjax.losses.

1. Golden values: each loss against a straightforward float64 NumPy reference (loops over rows / pairs),
   plus a few closed-form cases.
2. Sharding: on 8 fake CPU devices with meshes (8,1,1), (4,2,1), (2,2,2) (axes data, fsdp, tensor; batch
   over ("data", "fsdp")), the loss, its metrics and its gradients wrt the parameters of a tiny stand-in
   encoder under jax.jit with sharded inputs equal the single-device computation to 1e-5 relative; the
   shard_map forms equal the dense ones.
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from embedjax import losses as L

MESH_SHAPES = [(8, 1, 1), (4, 2, 1), (2, 2, 2)]
AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")


def make_mesh(shape):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def rand_unit(rng, *shape):
    return unit(rng.standard_normal(shape)).astype(np.float32)


def assert_rel_close(actual, expected, rtol=1e-5, what=""):
    """Every leaf: max |actual - expected| <= rtol * max |expected| (relative to the leaf's scale)."""
    a_leaves = jax.tree_util.tree_leaves_with_path(actual)
    e_leaves = jax.tree_util.tree_leaves_with_path(expected)
    assert [p for p, _ in a_leaves] == [p for p, _ in e_leaves], f"{what}: different trees"
    for (path, a), (_, e) in zip(a_leaves, e_leaves):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert a.shape == e.shape, f"{what}{jax.tree_util.keystr(path)}: shape {a.shape} != {e.shape}"
        assert np.all(np.isfinite(a)), f"{what}{jax.tree_util.keystr(path)}: not finite"
        err, scale = np.max(np.abs(a - e), initial=0.0), np.max(np.abs(e), initial=0.0)
        assert err <= rtol * scale, (f"{what}{jax.tree_util.keystr(path)}: max abs err {err:.3g} > "
                                     f"{rtol} x max|expected| {scale:.3g}")


# ---------------------------------------------------------------------------------- NumPy references


# Tiny programs: LLVM optimisation costs more than it saves (halves the compile time; same HLO passes).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def run_jitted(fn, *args):
    """``jax.jit(fn)(*args)``, compiled with FAST_COMPILE."""
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def call(fn, *args, **options):
    """``fn(*args, **options)`` as one jitted program (much faster than op-by-op dispatch); options (floats,
    flags, small arrays) are baked in as constants, so concrete-value checks still run."""
    return run_jitted(lambda *a: fn(*a, **options), *args)


def np_logsumexp(x):
    m = np.max(x)
    return m + np.log(np.sum(np.exp(x - m)))


def np_in_batch_softmax(q, d, temperature, hn=None, bidirectional=True, same_tower=False, margin=0.0,
                        hn_valid=None):
    q, d = np.float64(q), np.float64(d)
    B = len(q)
    q2d, d2q, correct = [], [], []
    for i in range(B):
        cands = [q[i] @ d[j] for j in range(B)]
        if hn is not None:
            cands += [q[i] @ np.float64(hn[j, k]) for j in range(B) for k in range(hn.shape[1])
                      if hn_valid is None or hn_valid[j, k]]
        if same_tower:
            cands += [q[i] @ q[j] for j in range(B) if j != i]
        cands = np.array(cands)
        correct.append(np.argmax(cands) == i)
        logits = cands / temperature
        logits[i] = (cands[i] - margin) / temperature
        q2d.append(np_logsumexp(logits) - logits[i])
        back = np.array([d[i] @ q[j] for j in range(B)]) / temperature
        back[i] = (d[i] @ q[i] - margin) / temperature
        d2q.append(np_logsumexp(back) - back[i])
    loss = 0.5 * (np.mean(q2d) + np.mean(d2q)) if bidirectional else np.mean(q2d)
    return loss, np.mean(correct)


def np_sigmoid(q, d, t, b):
    q, d = np.float64(q), np.float64(d)
    B = len(q)
    total = 0.0
    for i in range(B):
        for j in range(B):
            z = t * (q[i] @ d[j]) + b
            y = 1.0 if i == j else -1.0
            total += np.log1p(np.exp(-y * z))  # -log sigmoid(y z)
    return total / B


def np_cosent(sims, scores, scale):
    terms = [0.0]
    for i in range(len(sims)):
        for j in range(len(sims)):
            if scores[i] < scores[j]:
                terms.append(scale * (sims[i] - sims[j]))
    return np_logsumexp(np.array(terms))


def np_cos(a, b):
    return np.sum(unit(np.float64(a)) * unit(np.float64(b)), axis=-1)


def np_angle_sim(x, y):
    x, y = np.float64(x), np.float64(y)
    h = x.shape[1] // 2
    out = []
    for u, w in zip(x, y):
        za, zb = u[:h] + 1j * u[h:], w[:h] + 1j * w[h:]
        quotient = za * np.conj(zb) / np.sum(np.abs(zb) ** 2)   # elementwise a_k / b, over |b|^2
        quotient /= np.linalg.norm(u) / np.linalg.norm(w)
        out.append(abs(np.sum(quotient.real) + np.sum(quotient.imag)))
    return np.array(out)


def np_distill_kl(student, teacher, ts, tt, mask=None):
    out = []
    for r in range(len(student)):
        keep = np.ones(student.shape[1], bool) if mask is None else mask[r]
        s, t = np.float64(student[r][keep]) / ts, np.float64(teacher[r][keep]) / tt
        logp, logq = t - np_logsumexp(t), s - np_logsumexp(s)
        out.append(np.sum(np.exp(logp) * (logp - logq)))
    return np.mean(out)


def np_margin_mse(q, pos, neg, tp, tn, scale):
    q, pos, neg = np.float64(q), np.float64(pos), np.float64(neg)
    errs = []
    for i in range(len(q)):
        negs = neg[i] if neg.ndim == 3 else neg[i][None]
        tns = np.atleast_1d(tn[i])
        for k in range(len(negs)):
            errs.append((scale * (q[i] @ pos[i] - q[i] @ negs[k]) - (tp[i] - tns[k])) ** 2)
    return np.mean(errs)


# ------------------------------------------------------------------------------------- golden values


def test_in_batch_softmax_masks_missing_hard_negatives():
    """Slots of examples with fewer than K negatives are dropped from every query's candidates."""
    rng = np.random.default_rng(3)
    q, d, negs = rand_unit(rng, 5, 4), rand_unit(rng, 5, 4), rand_unit(rng, 5, 3, 4)
    valid = rng.random((5, 3)) > 0.4
    loss, _ = call(L.in_batch_softmax, q, d, temperature=0.1, hard_negatives_BxKxD=negs,
                   hard_negatives_valid_BxK=valid, same_tower=True)
    ref, _ = np_in_batch_softmax(q, d, 0.1, negs, True, True, 0.0, hn_valid=valid)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    unmasked, _ = call(L.in_batch_softmax, q, d, temperature=0.1, hard_negatives_BxKxD=negs, same_tower=True)
    assert abs(float(unmasked) - ref) > 1e-3


def test_in_batch_softmax_closed_form():
    eye = np.eye(2, dtype=np.float32)
    loss, m = call(L.in_batch_softmax, eye, eye, temperature=1.0)
    np.testing.assert_allclose(loss, np.log1p(np.exp(-1.0)), rtol=1e-6)  # -log(e / (e + 1))
    assert float(m["accuracy"]) == 1.0
    loss, _ = call(L.in_batch_softmax, eye, eye, temperature=1.0, margin=0.5)
    np.testing.assert_allclose(loss, np.log1p(np.exp(-0.5)), rtol=1e-6)
    loss, _ = call(L.in_batch_softmax, eye, eye, temperature=0.5, same_tower=True, bidirectional=False)
    np.testing.assert_allclose(loss, np.log(1 + 2 * np.exp(-2.0)), rtol=1e-6)  # one doc + one query negative


@pytest.mark.parametrize("hn,same_tower,bidirectional,margin", [
    (False, False, True, 0.0), (False, False, False, 0.0), (True, False, True, 0.0),
    (True, True, True, 0.2), (False, True, False, 0.1)])
def test_in_batch_softmax_matches_numpy(hn, same_tower, bidirectional, margin):
    rng = np.random.default_rng(0)
    q, d = rand_unit(rng, 6, 5), rand_unit(rng, 6, 5)
    d[:3] = unit(q[:3] + 0.3 * d[:3])  # some positives closer, so accuracy is not trivially 0
    negs = rand_unit(rng, 6, 3, 5) if hn else None
    loss, m = call(L.in_batch_softmax, q, d, temperature=0.07, hard_negatives_BxKxD=negs,
                                 bidirectional=bidirectional, same_tower=same_tower, margin=margin)
    ref, ref_acc = np_in_batch_softmax(q, d, 0.07, negs, bidirectional, same_tower, margin)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    np.testing.assert_allclose(m["accuracy"], ref_acc)
    assert 0 < ref_acc < 1
    np.testing.assert_allclose(m["pos_sim"], np.mean(np.sum(np.float64(q) * d, -1)), rtol=1e-5)


def test_sigmoid_matches_numpy_and_closed_form():
    eye = np.eye(2, dtype=np.float32)
    loss, _ = call(L.sigmoid_loss, eye, eye, t=1.0, b=0.0)
    np.testing.assert_allclose(loss, np.log1p(np.exp(-1.0)) + np.log(2.0), rtol=1e-6)
    rng = np.random.default_rng(1)
    q, d = rand_unit(rng, 7, 4), rand_unit(rng, 7, 4)
    loss, m = call(L.sigmoid_loss, q, d, t=10.0, b=-3.0)
    np.testing.assert_allclose(loss, np_sigmoid(q, d, 10.0, -3.0), rtol=1e-5)
    logits = 10.0 * np.float64(q) @ np.float64(d).T - 3.0
    np.testing.assert_allclose(m["accuracy"], np.mean(np.argmax(logits, 1) == np.arange(7)))
    np.testing.assert_allclose(m["pos_logit"], np.mean(np.diag(logits)), rtol=1e-5)


def test_cosent_matches_numpy_and_closed_form():
    a = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)
    b = np.array([[2.0, 0.0], [0.0, 3.0]], np.float32)  # cosines (1, 0): cosent normalises itself
    loss, m = call(L.cosent_loss, a, b, np.array([1.0, 0.0]), scale=2.0)   # right order
    np.testing.assert_allclose(loss, np.log1p(np.exp(-2.0)), rtol=1e-6)
    assert float(m["accuracy"]) == 1.0
    loss, m = call(L.cosent_loss, a, b, np.array([0.0, 1.0]), scale=2.0)   # wrong order
    np.testing.assert_allclose(loss, np.log1p(np.exp(2.0)), rtol=1e-6)
    assert float(m["accuracy"]) == 0.0
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((9, 6)).astype(np.float32), rng.standard_normal((9, 6)).astype(np.float32)
    scores = np.round(rng.uniform(0, 5, 9), 1).astype(np.float32)
    scores[3] = scores[4]  # ties contribute no pair
    loss, _ = call(L.cosent_loss, a, b, scores, scale=20.0)
    np.testing.assert_allclose(loss, np_cosent(np_cos(a, b), scores, 20.0), rtol=1e-5)


def test_angle_matches_numpy():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((8, 6)).astype(np.float32), rng.standard_normal((8, 6)).astype(np.float32)
    scores = rng.uniform(0, 5, 8).astype(np.float32)
    np.testing.assert_allclose(call(L.angle_similarity, a, b), np_angle_sim(a, b), rtol=1e-5)
    loss, _ = call(L.angle_loss, a, b, scores)
    np.testing.assert_allclose(loss, np_cosent(np_angle_sim(a, b), scores, 20.0), rtol=1e-5)
    loss, _ = call(L.angle_loss, a, b, scores, cosine_weight=0.5)
    ref = np_cosent(np_angle_sim(a, b), scores, 20.0) + 0.5 * np_cosent(np_cos(a, b), scores, 20.0)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)


def test_angle_similarity_is_cosine_plus_sine():
    """sentence-transformers' form of the same quantity (util.pairwise_angle_sim): |cos + sin| where the sine
    pairs dimension i with i + D/2 after L2 normalisation."""
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((5, 8)), rng.standard_normal((5, 8))
    x, y = unit(a), unit(b)
    sines = np.sum(x[:, 4:] * y[:, :4] - x[:, :4] * y[:, 4:], axis=1)
    ref = np.abs(np.sum(x * y, axis=1) + sines)
    np.testing.assert_allclose(call(L.angle_similarity, np.float32(a), np.float32(b)), ref, rtol=1e-5)


def test_distill_kl_matches_numpy():
    rng = np.random.default_rng(5)
    q, d, hn = rand_unit(rng, 5, 4), rand_unit(rng, 5, 4), rand_unit(rng, 5, 2, 4)
    s, mask = call(L.candidate_scores, q, d, hard_negatives_BxKxD=hn, same_tower=True)
    assert s.shape == (5, 5 + 10 + 5) and not bool(mask[2, 15 + 2]) and int(mask.sum()) == 5 * 19
    teacher = rng.standard_normal(s.shape).astype(np.float32)
    s, mask = np.asarray(s), np.asarray(mask)
    loss, m = call(L.distill_kl, s, teacher, student_temperature=0.05, teacher_temperature=0.5, mask_BxN=mask)
    np.testing.assert_allclose(loss, np_distill_kl(s, teacher, 0.05, 0.5, mask), rtol=1e-5)
    top_s, top_t = np.argmax(np.where(mask, s, -np.inf), 1), np.argmax(np.where(mask, teacher, -np.inf), 1)
    np.testing.assert_allclose(m["accuracy"], np.mean(top_s == top_t))
    same, _ = call(L.distill_kl, teacher, teacher, student_temperature=2.0, teacher_temperature=2.0)
    assert abs(float(same)) < 1e-6
    g = run_jitted(jax.grad(lambda x: L.distill_kl(x, teacher, student_temperature=0.1,
                                                   teacher_temperature=1.0, mask_BxN=mask)[0]), s)
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[~mask] == 0)


@pytest.mark.parametrize("k", [None, 3])
def test_margin_mse_matches_numpy(k):
    rng = np.random.default_rng(6)
    q, pos = rand_unit(rng, 6, 4), rand_unit(rng, 6, 4)
    neg = rand_unit(rng, 6, 4) if k is None else rand_unit(rng, 6, k, 4)
    tp = rng.normal(5, 2, 6).astype(np.float32)
    tn = rng.normal(3, 2, (6,) if k is None else (6, k)).astype(np.float32)
    loss, m = call(L.margin_mse, q, pos, neg, tp, tn, scale=7.0)
    np.testing.assert_allclose(loss, np_margin_mse(q, pos, neg, tp, tn, 7.0), rtol=1e-5)
    assert 0.0 <= float(m["accuracy"]) <= 1.0


def test_matryoshka_matches_numpy():
    rng = np.random.default_rng(7)
    q, d, hn = rand_unit(rng, 6, 8), rand_unit(rng, 6, 8), rand_unit(rng, 6, 2, 8)
    fn = L.matryoshka(L.in_batch_softmax, dims=(8, 4, 2), weights=(1.0, 0.5, 0.25))
    loss, m = call(fn, q, d, temperature=0.1, hard_negatives_BxKxD=hn, same_tower=True)
    def prefix(x, k):
        return x if k == x.shape[-1] else unit(x[..., :k])

    refs = [np_in_batch_softmax(prefix(q, k), prefix(d, k), 0.1, prefix(hn, k), True, True)[0]
            for k in (8, 4, 2)]
    np.testing.assert_allclose(loss, refs[0] + 0.5 * refs[1] + 0.25 * refs[2], rtol=1e-5)
    np.testing.assert_allclose(m["loss_dim4"], refs[1], rtol=1e-5)
    full, full_m = call(L.in_batch_softmax, q, d, temperature=0.1, hard_negatives_BxKxD=hn, same_tower=True)
    assert float(m["accuracy"]) == float(full_m["accuracy"]) and float(m["loss_dim8"]) == float(full)
    raw, _ = call(L.matryoshka(L.in_batch_softmax, dims=(4,), normalize=False), q, d, temperature=0.1)
    np.testing.assert_allclose(raw, np_in_batch_softmax(q[:, :4], d[:, :4], 0.1)[0], rtol=1e-5)
    # Scores (1-D) pass through untouched.
    cos, _ = call(L.matryoshka(L.cosent_loss, dims=(4,)), q, d, np.arange(6.0))
    np.testing.assert_allclose(cos, np_cosent(np_cos(q[:, :4], d[:, :4]), np.arange(6.0), 20.0), rtol=1e-5)


def test_registry():
    rng = np.random.default_rng(8)
    q, d = rand_unit(rng, 4, 8), rand_unit(rng, 4, 8)
    for name in L.LOSS_NAMES:
        assert callable(L.get_loss(name))
    fn = L.get_loss("InfoNCE", temperature=0.05, bidirectional=False)
    np.testing.assert_allclose(call(fn, q, d)[0], np_in_batch_softmax(q, d, 0.05, bidirectional=False)[0],
                               rtol=1e-5)
    # A learned temperature is passed at call time.
    np.testing.assert_allclose(call(fn, q, d, temperature=0.1)[0],
                               np_in_batch_softmax(q, d, 0.1, bidirectional=False)[0], rtol=1e-5)
    mat = L.get_loss("sigmoid", matryoshka_dims=[8, 4])
    loss, m = call(mat, q, d, t=5.0, b=-1.0)
    ref = np_sigmoid(q, d, 5, -1) + np_sigmoid(unit(q[:, :4]), unit(d[:, :4]), 5, -1)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    assert "loss_dim4" in m
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        L.get_loss("nope")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['temprature'\]"):
        L.get_loss("in_batch_softmax", temprature=0.05)
    with pytest.raises(ValueError, match="Matryoshka needs embeddings"):
        L.get_loss("distill_kl", matryoshka_dims=[4])


def test_bad_inputs_say_what_is_wrong():
    q = np.ones((4, 8), np.float32)
    with pytest.raises(ValueError, match=r"in_batch_softmax: q_BxD, d_BxD must have the same shape"):
        L.in_batch_softmax(q, np.ones((4, 6), np.float32), temperature=0.1)
    with pytest.raises(ValueError, match="hard_negatives_BxKxD must have shape"):
        L.in_batch_softmax(q, q, temperature=0.1, hard_negatives_BxKxD=np.ones((4, 8), np.float32))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        L.in_batch_softmax(q, q, temperature=0.0)
    with pytest.raises(ValueError, match="margin must be >= 0"):
        L.in_batch_softmax(q, q, temperature=0.1, margin=-1.0)
    with pytest.raises(ValueError, match=r"cosent_loss: scores_B must have shape \[B\] = \[4\]"):
        L.cosent_loss(q, q, np.ones(3))
    with pytest.raises(ValueError, match="must be even"):
        L.angle_loss(np.ones((4, 5)), np.ones((4, 5)), np.ones(4))
    with pytest.raises(ValueError, match="exceed the embedding dim 8"):
        L.matryoshka(L.in_batch_softmax, dims=(16, 8))(q, q, temperature=0.1)
    mesh = make_mesh((8, 1, 1))
    with pytest.raises(ValueError, match="global batch 4 is not divisible by the 8 shards"):
        L.sigmoid_loss_sharded(q, q, t=1.0, b=0.0, mesh=mesh)
    with pytest.raises(ValueError, match=r"axis_names \['batch'\] are not axes of the mesh"):
        L.in_batch_softmax_sharded(q, q, temperature=0.1, mesh=mesh, axis_names=("batch",))


# ------------------------------------------------------------------------ sharded == single device

F, D, B, K = 12, 16, 16, 2


def encode(w_FxD, x_BxF):
    """Tiny stand-in encoder: a linear map from features to embeddings, then L2 norm."""
    return L.l2_normalize(x_BxF @ w_FxD)


def make_params_and_batch():
    rng = np.random.default_rng(9)
    params = {"wq": rng.standard_normal((F, D)).astype(np.float32) / np.sqrt(F),
              "wd": rng.standard_normal((F, D)).astype(np.float32) / np.sqrt(F),
              "log_t": np.float32(np.log(0.05)), "log_s": np.float32(np.log(10.0)), "bias": np.float32(-2.0)}
    xq = rng.standard_normal((B, F)).astype(np.float32)
    batch = {"xq": xq, "xd": (xq + 0.5 * rng.standard_normal((B, F))).astype(np.float32),  # related pairs
             "xhn": rng.standard_normal((B, K, F)).astype(np.float32),
             "scores": rng.uniform(0, 5, B).astype(np.float32),
             "teacher_BxN": rng.standard_normal((B, B + B * K + B)).astype(np.float32),
             "teacher_pos": rng.normal(4, 1, B).astype(np.float32),
             "teacher_neg": rng.normal(2, 1, B).astype(np.float32)}
    return params, batch


def towers(params, batch):
    return (encode(params["wq"], batch["xq"]), encode(params["wd"], batch["xd"]),
            encode(params["wd"], batch["xhn"]))


def combine(**parts):
    """Several losses in one program (fewer compilations): their sum, and each one's loss and metrics."""
    total, metrics = 0.0, {}
    for name, (loss, m) in parts.items():
        total = total + loss
        metrics.update({f"{name}/loss": loss, **{f"{name}/{k}": v for k, v in m.items()}})
    return total, metrics


def case_softmax(mesh):
    del mesh  # GSPMD does the gathering: the same code runs sharded and on one device

    def loss(params, batch):
        q, d, hn = towers(params, batch)
        t = jnp.exp(params["log_t"])
        return combine(
            hn_same_tower_margin=L.in_batch_softmax(q, d, temperature=t, hard_negatives_BxKxD=hn,
                                                    same_tower=True, margin=0.1),
            q2d=L.in_batch_softmax(q, d, temperature=t, bidirectional=False))
    return loss


def case_matryoshka_softmax(mesh):
    del mesh

    def loss(params, batch):
        q, d, hn = towers(params, batch)
        fn = L.matryoshka(L.in_batch_softmax, dims=(16, 4), weights=(1.0, 0.5))
        return fn(q, d, temperature=jnp.exp(params["log_t"]), hard_negatives_BxKxD=hn, same_tower=True)
    return loss


def case_other_losses(mesh):
    del mesh

    def loss(params, batch):
        q, d, hn = towers(params, batch)
        s, mask = L.candidate_scores(q, d, hard_negatives_BxKxD=hn, same_tower=True)
        return combine(
            sigmoid=L.sigmoid_loss(q, d, t=jnp.exp(params["log_s"]), b=params["bias"]),
            cosent=L.cosent_loss(q, d, batch["scores"]),
            angle=L.angle_loss(q, d, batch["scores"], cosine_weight=0.5),
            distill_kl=L.distill_kl(s, batch["teacher_BxN"], student_temperature=jnp.exp(params["log_t"]),
                                    teacher_temperature=1.0, mask_BxN=mask),
            margin_mse=L.margin_mse(q, d, hn[:, 0], batch["teacher_pos"], batch["teacher_neg"], scale=5.0))
    return loss


def case_sharded_softmax(mesh):
    """shard_map form when a mesh is given; the reference (mesh None) is the dense form on one device."""
    def loss(params, batch):
        q, d, hn = towers(params, batch)
        t = jnp.exp(params["log_t"])
        fn = L.in_batch_softmax if mesh is None else functools.partial(L.in_batch_softmax_sharded, mesh=mesh)
        return combine(hn_same_tower_margin=fn(q, d, temperature=t, hard_negatives_BxKxD=hn, same_tower=True,
                                               margin=0.1),
                       q2d=fn(q, d, temperature=t, bidirectional=False))
    return loss


def case_ring_softmax(mesh):
    """The ring form (ppermute) against the dense form: hard negatives with padded slots, same-tower
    negatives, margin, learned temperature; and the bidirectional in-batch loss in Matryoshka."""
    def loss(params, batch):
        q, d, hn = towers(params, batch)
        t = jnp.exp(params["log_t"])
        fn = L.in_batch_softmax if mesh is None else functools.partial(L.in_batch_softmax_ring, mesh=mesh)
        valid = np.arange(B * K).reshape(B, K) % 5 != 3
        return combine(hn_same_tower_margin=fn(q, d, temperature=t, hard_negatives_BxKxD=hn, same_tower=True,
                                               margin=0.1, hard_negatives_valid_BxK=valid,
                                               bidirectional=False),
                       bidir=L.matryoshka(fn, dims=(16, 4))(q, d, temperature=t))
    return loss


def case_sharded_matryoshka_sigmoid(mesh):
    """The ring form, wrapped in Matryoshka: its full-dim term is the plain sharded sigmoid loss."""
    def loss(params, batch):
        q, d, _ = towers(params, batch)
        fn = L.sigmoid_loss if mesh is None else functools.partial(L.sigmoid_loss_sharded, mesh=mesh)
        return L.matryoshka(fn, dims=(16, 4))(q, d, t=jnp.exp(params["log_s"]), b=params["bias"])
    return loss


CASES = {"softmax": case_softmax, "matryoshka_softmax": case_matryoshka_softmax,
         "other_losses": case_other_losses, "sharded_softmax": case_sharded_softmax,
         "ring_softmax": case_ring_softmax,
         "sharded_matryoshka_sigmoid": case_sharded_matryoshka_sigmoid}


@functools.cache
def single_device_reference(case):
    params, batch = make_params_and_batch()
    dev = jax.devices()[0]
    params, batch = jax.device_put((params, batch), dev)
    (loss, metrics), grads = run_jitted(jax.value_and_grad(CASES[case](None), has_aux=True), params, batch)
    return jax.device_get((loss, metrics, grads))


def shard(mesh, params, batch):
    param_specs = {"wq": P(None, "tensor"), "wd": P(None, "tensor"), "log_t": P(), "log_s": P(), "bias": P()}
    params = {k: jax.device_put(v, NamedSharding(mesh, param_specs[k])) for k, v in params.items()}
    batch = {k: jax.device_put(v, NamedSharding(mesh, P(BATCH, *([None] * (v.ndim - 1)))))
             for k, v in batch.items()}
    return params, batch


@pytest.mark.parametrize("shape", MESH_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", list(CASES))
def test_sharded_equals_single_device(case, shape):
    mesh = make_mesh(shape)
    ref_loss, ref_metrics, ref_grads = single_device_reference(case)
    params, batch = shard(mesh, *make_params_and_batch())
    assert len(batch["xq"].sharding.device_set) == 8
    (loss, metrics), grads = run_jitted(jax.value_and_grad(CASES[case](mesh), has_aux=True), params, batch)
    assert_rel_close(loss, ref_loss, what=f"{case} loss")
    assert_rel_close(metrics, ref_metrics, what=f"{case} metrics")
    assert_rel_close(grads, ref_grads, what=f"{case} grads")
    # The comparison means something: gradients reach the encoder and any learned temperature / bias.
    assert np.linalg.norm(ref_grads["wq"]) > 1e-4 and np.linalg.norm(ref_grads["wd"]) > 1e-4
    if "softmax" in case or case == "other_losses":
        assert abs(ref_grads["log_t"]) > 1e-6
    if "sigmoid" in case or case == "other_losses":
        assert abs(ref_grads["log_s"]) > 1e-6 and abs(ref_grads["bias"]) > 1e-6


RING_FORMS = {  # ring form, its dense form
    "sigmoid": (lambda q, d, mesh: L.sigmoid_loss_sharded(q, d, t=10.0, b=-5.0, mesh=mesh)[0],
                lambda q, d: L.sigmoid_loss(q, d, t=10.0, b=-5.0)[0]),
    "softmax": (lambda q, d, mesh: L.in_batch_softmax_ring(q, d, temperature=0.05, same_tower=True, mesh=mesh)[0],
                lambda q, d: L.in_batch_softmax(q, d, temperature=0.05, same_tower=True)[0]),
}


@pytest.mark.parametrize("form", list(RING_FORMS))
def test_ring_forms_never_materialise_global_arrays(form):
    """The ring forms' compiled per-device programs have no all-gather and no [B, B] / [B, D] array."""
    mesh = make_mesh((4, 2, 1))
    rng = np.random.default_rng(10)
    big_B = 64
    q, d = rand_unit(rng, big_B, D), rand_unit(rng, big_B, D)
    spec = NamedSharding(mesh, P(BATCH, None))
    q, d = jax.device_put(q, spec), jax.device_put(d, spec)
    ring, dense_fn = RING_FORMS[form]

    def f(q, d):
        return ring(q, d, mesh)

    def array_dims(hlo):
        return {int(n) for shape in re.findall(r"f32\[([0-9,]*)\]", hlo) for n in shape.split(",") if n}

    hlo = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(q, d).compile().as_text()
    assert "collective-permute" in hlo
    assert "all-gather" not in hlo
    assert big_B not in array_dims(hlo)  # only [b, D], [b, b] and smaller arrays
    # ... while the dense form under GSPMD gathers the documents.
    dense = jax.jit(jax.value_and_grad(dense_fn, argnums=(0, 1)))
    dense_hlo = dense.lower(q, d).compile().as_text()
    assert "all-gather" in dense_hlo and big_B in array_dims(dense_hlo)


def test_quantization_aware_and_spread_out():
    """Quantisation-aware training adds the loss on straight-through binary / int8 embeddings (binary dot
    products are 1 - 2 hamming / D; gradients pass straight through), inside Matryoshka each prefix is
    quantised; the spread-out regulariser is zero for orthogonal documents and positive for collapsed ones."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from embedjax import losses

    rng = np.random.default_rng(0)
    q = losses.l2_normalize(jnp.asarray(rng.normal(size=(8, 16)), jnp.float32))
    d = losses.l2_normalize(q + 0.3 * jnp.asarray(rng.normal(size=(8, 16)), jnp.float32))
    b = losses.quantize_ste(q, "binary")
    hamming = (np.asarray(q)[:, None] > 0) != (np.asarray(q)[None] > 0)
    np.testing.assert_allclose(np.asarray(b @ b.T), 1 - 2 * hamming.sum(-1) / 16, atol=1e-6)
    g = jax.grad(lambda x: jnp.sum(losses.quantize_ste(x, "binary") * jnp.arange(16.0)))(q)
    np.testing.assert_allclose(np.asarray(g), np.broadcast_to(np.arange(16.0), (8, 16)))   # straight through
    i8 = losses.quantize_ste(q, "int8")
    assert float(jnp.abs(i8 - q).max()) <= float((q.max(0) - q.min(0)).max()) / 255 + 1e-6

    plain = losses.get_loss("in_batch_softmax", temperature=0.05)
    qat = losses.get_loss("in_batch_softmax", temperature=0.05, quantization_aware="binary", quantization_weight=0.5)
    l0, _ = plain(q, d)
    l1, m = qat(q, d)
    lb, _ = plain(losses.quantize_ste(q, "binary"), losses.quantize_ste(d, "binary"))
    np.testing.assert_allclose(float(l1), float(l0) + 0.5 * float(lb), rtol=1e-6)
    assert "loss_binary" in m and "loss_float" in m
    mat = losses.get_loss("in_batch_softmax", temperature=0.05, quantization_aware="binary",
                          matryoshka_dims=(16, 8))
    l2, m2 = mat(q, d)
    cut = lambda x: losses.l2_normalize(x[:, :8])  # noqa: E731
    want = float(qat(q, d)[0]) - 0.5 * float(lb) + float(lb) + float(
        plain(cut(q), cut(d))[0] + plain(losses.quantize_ste(cut(q), "binary"), losses.quantize_ste(cut(d), "binary"))[0])
    np.testing.assert_allclose(float(l2), want, rtol=1e-5)

    eye = jnp.eye(8, 16)
    assert float(losses.spread_out(eye, eye)) == 0.0
    same = jnp.ones((8, 16)) / 4.0
    assert float(losses.spread_out(same, same)) > 0.9
    reg = losses.get_loss("in_batch_softmax", temperature=0.05, spread_out_weight=2.0)
    np.testing.assert_allclose(float(reg(q, d)[0]), float(l0) + 2.0 * float(losses.spread_out(q, d)), rtol=1e-6)
    with pytest.raises(ValueError, match="shard_map forms never hold"):
        losses.get_loss("in_batch_softmax_ring", temperature=0.05, spread_out_weight=1.0)
