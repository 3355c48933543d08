"""Config -> objective(embeddings, loss_params, batch) -> (loss, metrics), the glue between the train step's
embeddings and the pure losses in `embedjax.losses`. Learned loss parameters (log temperature, sigmoid bias)
live in the train state under params["loss"]."""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax.numpy as jnp

from embedjax import losses


def make_objective(loss_cfg: Mapping[str, Any]):
    """Returns (objective, initial loss params)."""
    name = loss_cfg.get("name", "in_batch_softmax")
    mat = {}
    if loss_cfg.get("matryoshka_dims"):
        mat = {"matryoshka_dims": tuple(loss_cfg["matryoshka_dims"])}
        if loss_cfg.get("matryoshka_weights"):
            mat["matryoshka_weights"] = tuple(loss_cfg["matryoshka_weights"])
    loss_params: dict[str, float] = {}
    learn_t = bool(loss_cfg.get("learn_temperature", False))

    if name in ("in_batch_softmax", "in_batch_softmax_sharded"):
        fn = losses.get_loss("in_batch_softmax", bidirectional=bool(loss_cfg.get("bidirectional", True)),
                             same_tower=bool(loss_cfg.get("same_tower", False)),
                             margin=float(loss_cfg.get("margin", 0.0)), **mat)
        t0 = float(loss_cfg.get("temperature", 0.05))
        if learn_t:
            loss_params["log_t"] = math.log(t0)

        def objective(e, lp, batch):
            t = jnp.exp(lp["log_t"]) if learn_t else t0
            hn = e.get("negatives")
            valid = batch.get("negative_valid") if hn is not None else None
            return fn(e["query"], e["document"], temperature=t, hard_negatives_BxKxD=hn,
                      hard_negatives_valid_BxK=valid)

    elif name in ("sigmoid", "sigmoid_sharded"):
        fn = losses.get_loss("sigmoid", **mat)
        loss_params = {"log_t": math.log(float(loss_cfg.get("sigmoid_t", 10.0))),
                       "logit_bias": float(loss_cfg.get("sigmoid_b", -10.0))}

        def objective(e, lp, batch):
            return fn(e["query"], e["document"], t=jnp.exp(lp["log_t"]), b=lp["logit_bias"])

    elif name in ("cosent", "angle"):
        fn = losses.get_loss(name, scale=float(loss_cfg.get("scale", 20.0)), **mat)

        def objective(e, lp, batch):
            if "scores" not in batch:
                raise ValueError(f"loss {name!r} needs scored pairs (batch 'scores'); use data.kind='stsb'")
            return fn(e["query"], e["document"], batch["scores"][:, 0])

    else:
        raise ValueError(f"loss.name {name!r} is not supported by the trainer; "
                         "supported: in_batch_softmax, sigmoid, cosent, angle")
    return objective, loss_params
