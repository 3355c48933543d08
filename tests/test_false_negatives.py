"""False-negative masks of the in-batch softmax against a reference built by hand from the texts.

The batch: 8 rows whose texts repeat on purpose. Row 3's positive is row 0's positive text; row 5 asks row 1's
query again (another positive of it); row 6's hard negative is row 2's positive text; row 7's query is row 4's
positive text (matters with same-tower negatives). Every other row has nothing in common with the rest, so
their per-row losses must not move when the mask is switched on.
"""
import jax
import numpy as np
import pytest

from embedjax import losses
from embedjax.data.pipeline import text_key_words
from embedjax.sharding import make_mesh


def _batch():
    q_texts = ["q0", "q1", "q2", "q3", "q4", "q1", "q6", "p4"]
    p_texts = ["p0", "p1", "p2", "p0", "p4", "p5", "p6", "p7"]
    n_texts = [["n0"], ["n1"], ["n2"], ["n3"], ["n4"], ["n5"], ["p2"], ["n7"]]
    rng = np.random.default_rng(0)
    D = 16
    emb = {t: rng.normal(size=D) for t in set(q_texts) | set(p_texts) | {t for r in n_texts for t in r}}
    emb = {t: v / np.linalg.norm(v) for t, v in emb.items()}
    # same text, same embedding (one tower), as a real encoder gives
    q = np.stack([emb[t] for t in q_texts]).astype(np.float32)
    d = np.stack([emb[t] for t in p_texts]).astype(np.float32)
    hn = np.stack([[emb[t] for t in r] for r in n_texts]).astype(np.float32)

    def key(t):
        return np.int64(int.from_bytes(t.encode().ljust(8, b"\0")[:8], "little") | (1 << 40))

    keys = (text_key_words(np.array([key(t) for t in q_texts])), text_key_words(np.array([key(t) for t in p_texts])),
            text_key_words(np.array([[key(t) for t in r] for r in n_texts])))
    return q_texts, p_texts, n_texts, q, d, hn, keys


def _reference_rows(q_texts, p_texts, n_texts, q, d, hn, *, t, mask, same_tower):
    """Per-row q->d and d->q losses written out candidate by candidate."""
    B = len(q_texts)
    q2d, d2q = [], []
    for i in range(B):
        cands = []   # (similarity, is a false negative)
        for j in range(B):
            fn = j != i and (p_texts[j] == p_texts[i] or q_texts[j] == q_texts[i])
            cands.append((q[i] @ d[j], fn))
        for j in range(B):
            for k, nt in enumerate(n_texts[j]):
                cands.append((q[i] @ hn[j, k], nt == p_texts[i]))
        if same_tower:
            for j in range(B):
                if j != i:
                    cands.append((q[i] @ q[j], q_texts[j] == q_texts[i] or q_texts[j] == p_texts[i]))
        logits = np.array([s / t for s, fn in cands if not (mask and fn)], np.float64)
        q2d.append(np.log(np.exp(logits).sum()) - (q[i] @ d[i]) / t)
        back = [d[i] @ q[j] / t for j in range(B)
                if not (mask and j != i and (q_texts[j] == q_texts[i] or p_texts[j] == p_texts[i]))]
        d2q.append(np.log(np.exp(np.array(back, np.float64)).sum()) - (d[i] @ q[i]) / t)
    return np.array(q2d), np.array(d2q)


@pytest.mark.parametrize("same_tower", [False, True])
def test_mask_changes_exactly_the_rows_with_a_false_negative(same_tower):
    q_texts, p_texts, n_texts, q, d, hn, keys = _batch()
    t = 0.05
    ref_q, ref_d = _reference_rows(q_texts, p_texts, n_texts, q, d, hn, t=t, mask=True, same_tower=same_tower)
    raw_q, raw_d = _reference_rows(q_texts, p_texts, n_texts, q, d, hn, t=t, mask=False, same_tower=same_tower)
    changed_q = set(np.flatnonzero(~np.isclose(ref_q, raw_q, rtol=0, atol=1e-9)).tolist())
    expected = {0, 3, 1, 5, 2} | ({4} if same_tower else set())   # row 7 itself has no false negative
    assert changed_q == expected
    assert set(np.flatnonzero(~np.isclose(ref_d, raw_d, rtol=0, atol=1e-9)).tolist()) == {0, 3, 1, 5}

    kw = dict(temperature=t, hard_negatives_BxKxD=hn, same_tower=same_tower, bidirectional=True)
    loss, m = losses.in_batch_softmax(q, d, false_negative_keys=keys, **kw)
    np.testing.assert_allclose(float(loss), 0.5 * (ref_q.mean() + ref_d.mean()), rtol=2e-6)
    np.testing.assert_allclose(float(m["loss_q2d"]), ref_q.mean(), rtol=2e-6)
    # masked: 0<->3 (same positive), 1<->5 (same query), row 2's positive as row 6's negative;
    # same tower adds query 7 (= positive of row 4) for row 4, and the queries of rows 1 / 5 for each other
    n_masked = 2 + 2 + 1 + (1 + 2 if same_tower else 0)
    np.testing.assert_allclose(float(m["false_negatives"]) * len(q), n_masked)
    unmasked, _ = losses.in_batch_softmax(q, d, **kw)
    np.testing.assert_allclose(float(unmasked), 0.5 * (raw_q.mean() + raw_d.mean()), rtol=2e-6)


def test_sharded_form_masks_the_same_candidates_values_and_gradients():
    _, _, _, q, d, hn, keys = _batch()
    mesh = make_mesh({"data": 8}, jax.devices()[:8])
    kw = dict(temperature=0.05, hard_negatives_BxKxD=hn, same_tower=True, false_negative_keys=keys)

    def dense(q, d):
        return losses.in_batch_softmax(q, d, **kw)[0]

    def sharded(q, d):
        return losses.in_batch_softmax_sharded(q, d, mesh=mesh, **kw)[0]

    v1, g1 = jax.value_and_grad(dense, argnums=(0, 1))(q, d)
    v2, g2 = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(q, d)
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-6)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    _, m = jax.jit(lambda q, d: losses.in_batch_softmax_sharded(q, d, mesh=mesh, **kw))(q, d)
    np.testing.assert_allclose(float(m["false_negatives"]) * 8, 8)


def test_keys_are_checked():
    _, _, _, q, d, hn, (qk, dk, hk) = _batch()
    with pytest.raises(ValueError, match="hard_negative_keys_BxKx2 must be given exactly"):
        losses.in_batch_softmax(q, d, temperature=0.05, hard_negatives_BxKxD=hn, false_negative_keys=(qk, dk, None))
    with pytest.raises(ValueError, match=r"query_keys_Bx2 must have shape \[8, 2\]"):
        losses.in_batch_softmax(q, d, temperature=0.05, false_negative_keys=(qk[:4], dk, None))


def test_text_key_words_keep_all_64_bits():
    k = np.array([1, 1 << 32, -1, (1 << 63) - 1, -(1 << 63)], np.int64)
    w = text_key_words(k)
    assert w.dtype == np.int32 and w.shape == (5, 2)
    back = (w[:, 0].astype(np.int64) << 32) | (w[:, 1].view(np.uint32).astype(np.int64))
    np.testing.assert_array_equal(back, k)
    assert len({tuple(r) for r in w.tolist()}) == 5
