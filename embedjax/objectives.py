"""Config -> objective(embeddings, loss_params, batch) -> (loss, metrics), the glue between the train step's
embeddings and the pure losses in `embedjax.losses`. Learned loss parameters (log temperature, sigmoid bias)
live in the train state under params["loss"].

Every name of `embedjax.config.LOSS_NAMES` is one entry of `OBJECTIVES` and trains exactly that form (a
test checks the two agree); there is no fallback from one form to another:

================================  ===========================================================================
``loss.name``                     what it is, and the batch keys it reads
================================  ===========================================================================
``in_batch_softmax``              InfoNCE over the global batch (+ hard negatives, same-tower negatives,
                                  bidirectional, margin, false-negative masks); ``query``, ``positive`` (+
                                  ``negative`` / ``negative_valid``; ``query_key`` / ``positive_key`` /
                                  ``negative_key`` with ``loss.mask_false_negatives``). GSPMD places the
                                  collectives.
``in_batch_softmax_sharded``      the same loss as a ``shard_map``: one all-gather of the documents, each device
                                  its own rows of the logits. Same value and gradients.
``in_batch_softmax_ring``         the same loss as a ``ppermute`` ring: document chunks (with their hard
                                  negatives, and queries for ``same_tower``) travel round the devices, each
                                  row's logsumexp accumulated online; no device holds the global documents.
``sigmoid``                       SigLIP pairwise sigmoid, learned ``t`` / ``b`` (``loss.sigmoid_t`` /
                                  ``loss.sigmoid_b`` initial values); ``query``, ``positive``.
``sigmoid_sharded``               the same as a ``ppermute`` ring: no device holds the global documents.
``cosent`` / ``angle``            CoSENT / AnglE on scored pairs (``data.kind='stsb'``): ``scores[:, 0]``.
``distill_kl``                    KL(teacher || student) over each query's positive and hard negatives: the
                                  student's ``sim / loss.temperature`` against the data's ``scores`` (teacher,
                                  positive first) ``/ loss.teacher_temperature``; slots without a negative or a
                                  score (``negative_valid``, ``scores_valid``) are left out.
``margin_mse``                    MarginMSE: ``loss.scale * (<q, pos> - <q, neg_k>)`` regresses onto
                                  ``scores[:, 0] - scores[:, k]`` for every valid negative ``k``.
================================  ===========================================================================
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax.numpy as jnp

from embedjax import losses

Objective = Callable[[dict, dict, dict], tuple[Any, dict]]


def _matryoshka(loss_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Options wrapping the loss: Matryoshka prefixes, quantisation-aware training, the spread-out regulariser."""
    mat: dict[str, Any] = {}
    q_weight = float(loss_cfg.get("quantization_weight", 1.0))
    if loss_cfg.get("quantization_aware"):
        mat.update(quantization_aware=str(loss_cfg["quantization_aware"]), quantization_weight=q_weight)
    if float(loss_cfg.get("spread_out_weight", 0.0) or 0.0):
        mat["spread_out_weight"] = float(loss_cfg["spread_out_weight"])
    if not loss_cfg.get("matryoshka_dims"):
        return mat
    mat["matryoshka_dims"] = tuple(loss_cfg["matryoshka_dims"])
    if loss_cfg.get("matryoshka_weights"):
        mat["matryoshka_weights"] = tuple(loss_cfg["matryoshka_weights"])
    return mat


def _needs_mesh(name: str, mesh: Any) -> dict[str, Any]:
    if mesh is None:
        raise ValueError(f"loss.name {name!r} is a shard_map form: it needs the training mesh")
    return {"mesh": mesh}


def _softmax(name: str):
    def build(loss_cfg: Mapping[str, Any], mesh: Any) -> tuple[Objective, dict[str, float]]:
        extra = _needs_mesh(name, mesh) if name.endswith(("_sharded", "_ring")) else {}
        fn = losses.get_loss(name, bidirectional=bool(loss_cfg["bidirectional"]),
                             same_tower=bool(loss_cfg["same_tower"]), margin=float(loss_cfg["margin"]),
                             **_matryoshka(loss_cfg))
        t0 = float(loss_cfg["temperature"])
        learn_t = bool(loss_cfg["learn_temperature"])
        # the ring form has no false-negative masks (config.LOSS_KEYS refuses the key for it)
        mask_fn = False if name.endswith("_ring") else bool(loss_cfg["mask_false_negatives"])

        def objective(e, lp, batch):
            t = jnp.exp(lp["log_t"]) if learn_t else t0
            hn = e.get("negatives")
            valid = batch.get("negative_valid") if hn is not None else None
            keys = {}
            if mask_fn:
                if "query_key" not in batch:
                    raise ValueError("loss.mask_false_negatives needs the batch's text keys (query_key, positive_key"
                                     "[, negative_key]); the data layer adds them when the option is on")
                keys["false_negative_keys"] = (batch["query_key"], batch["positive_key"],
                                               batch["negative_key"] if hn is not None else None)
            return fn(e["query"], e["document"], temperature=t, hard_negatives_BxKxD=hn,
                      hard_negatives_valid_BxK=valid, **keys, **extra)

        return objective, ({"log_t": math.log(t0)} if learn_t else {})
    return build


def _sigmoid(name: str):
    def build(loss_cfg: Mapping[str, Any], mesh: Any) -> tuple[Objective, dict[str, float]]:
        extra = _needs_mesh(name, mesh) if name.endswith("_sharded") else {}
        fn = losses.get_loss(name, **_matryoshka(loss_cfg))

        def objective(e, lp, batch):
            if "negatives" in e:
                raise ValueError(f"loss {name!r} uses in-batch negatives only; set data.num_negatives=0")
            return fn(e["query"], e["document"], t=jnp.exp(lp["log_t"]), b=lp["logit_bias"], **extra)

        return objective, {"log_t": math.log(float(loss_cfg["sigmoid_t"])),
                           "logit_bias": float(loss_cfg["sigmoid_b"])}
    return build


def _scored(name: str):
    def build(loss_cfg: Mapping[str, Any], mesh: Any) -> tuple[Objective, dict[str, float]]:
        fn = losses.get_loss(name, scale=float(loss_cfg["scale"]), **_matryoshka(loss_cfg))

        def objective(e, lp, batch):
            if "scores" not in batch:
                raise ValueError(f"loss {name!r} needs scored pairs (batch 'scores'); use data.kind='stsb'")
            return fn(e["query"], e["document"], batch["scores"][:, 0])

        return objective, {}
    return build


def _teacher(batch: dict, e: dict, name: str):
    """(teacher scores [B, 1+K], valid [B, 1+K]) of each query's positive and hard negatives."""
    if "negatives" not in e or "scores" not in batch:
        raise ValueError(f"loss {name!r} needs hard negatives with teacher scores (data 'negatives' and 'scores',"
                         " data.num_negatives >= 1)")
    valid = batch["scores_valid"].astype(bool)
    neg_valid = batch["negative_valid"].astype(bool)
    valid = valid & jnp.concatenate([jnp.ones_like(neg_valid[:, :1]), neg_valid], axis=1)
    return batch["scores"], valid


def _distill_kl(loss_cfg: Mapping[str, Any], mesh: Any) -> tuple[Objective, dict[str, float]]:
    t_student, t_teacher = float(loss_cfg["temperature"]), float(loss_cfg["teacher_temperature"])

    def objective(e, lp, batch):
        scores, valid = _teacher(batch, e, "distill_kl")
        cand = jnp.concatenate([e["document"][:, None, :], e["negatives"]], axis=1)     # [B, 1+K, D]
        student = jnp.einsum("bd,bnd->bn", e["query"].astype(jnp.float32), cand.astype(jnp.float32))
        return losses.distill_kl(student, scores, student_temperature=t_student, teacher_temperature=t_teacher,
                                 mask_BxN=valid)

    return objective, {}


def _margin_mse(loss_cfg: Mapping[str, Any], mesh: Any) -> tuple[Objective, dict[str, float]]:
    fn = losses.get_loss("margin_mse", scale=float(loss_cfg["scale"]), **_matryoshka(loss_cfg))

    def objective(e, lp, batch):
        scores, valid = _teacher(batch, e, "margin_mse")
        ok = valid[:, 1:] & valid[:, :1]
        return fn(e["query"], e["document"], e["negatives"], scores[:, 0], scores[:, 1:], valid=ok)

    return objective, {}


OBJECTIVES: dict[str, Callable[[Mapping[str, Any], Any], tuple[Objective, dict[str, float]]]] = {
    "in_batch_softmax": _softmax("in_batch_softmax"),
    "in_batch_softmax_sharded": _softmax("in_batch_softmax_sharded"),
    "in_batch_softmax_ring": _softmax("in_batch_softmax_ring"),
    "sigmoid": _sigmoid("sigmoid"),
    "sigmoid_sharded": _sigmoid("sigmoid_sharded"),
    "cosent": _scored("cosent"),
    "angle": _scored("angle"),
    "distill_kl": _distill_kl,
    "margin_mse": _margin_mse,
}


def two_d_matryoshka(objective: Objective, layers: tuple[int, ...], weights: tuple[float, ...] = ()
                     ) -> Objective:
    """2D Matryoshka (arXiv 2402.14776, Starbucks arXiv 2410.13230): the train step's embeddings carry the full
    model's embeddings followed by those of the first `layers[i]` layers (`DualEncoder(exit_layers=...)`); the
    loss is ``objective(full) + sum_i weights[i] * objective(after layers[i])``, each term over
    ``loss.matryoshka_dims`` when set. Metrics: the full model's, plus ``loss_layers{n}``."""
    from embedjax.models.dual_encoder import split_exits

    weights = tuple(float(w) for w in weights) or (1.0,) * len(layers)

    def objective_2d(e, lp, batch):
        parts = {k: split_exits(v, len(layers)) for k, v in e.items()}
        loss, metrics = objective({k: p[0] for k, p in parts.items()}, lp, batch)
        metrics = dict(metrics)
        for i, (n, w) in enumerate(zip(layers, weights)):
            sub_loss, _ = objective({k: p[i + 1] for k, p in parts.items()}, lp, batch)
            loss = loss + w * sub_loss
            metrics[f"loss_layers{n}"] = sub_loss
        return loss, metrics

    return objective_2d


def make_objective(loss_cfg: Mapping[str, Any], mesh: Any = None) -> tuple[Objective, dict[str, float]]:
    """(objective, initial loss params) for the config's `loss` section (base_config's keys; `mesh`: the
    training mesh, needed by the shard_map forms). With ``loss.matryoshka_layers`` the objective expects the
    train step's 2D Matryoshka embeddings (`two_d_matryoshka`)."""
    from embedjax.config import base_config

    cfg = dict(base_config().loss)
    cfg.update(dict(loss_cfg))
    name = cfg["name"]
    if name not in OBJECTIVES:
        raise ValueError(f"loss.name {name!r} is not one of {', '.join(OBJECTIVES)}")
    objective, loss_params = OBJECTIVES[name](cfg, mesh)
    if cfg.get("matryoshka_layers"):
        objective = two_d_matryoshka(objective, tuple(int(n) for n in cfg["matryoshka_layers"]),
                                     tuple(cfg.get("matryoshka_layer_weights") or ()))
    return objective, loss_params
