"""Optax chains from config: AdamW / Adafactor, warmup then linear or cosine decay, global-norm clipping,
weight-decay masks and parameter freezing by regex."""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import optax


def schedule(peak: float, total_steps: int, warmup_steps: int = 0, decay: str = "linear",
             end_factor: float = 0.0) -> optax.Schedule:
    """Linear warmup to `peak`, then `decay` ('linear' | 'cosine' | 'constant') to peak * end_factor."""
    if decay not in ("linear", "cosine", "constant"):
        raise ValueError(f"decay must be linear, cosine or constant, got {decay!r}")
    warmup_steps = max(0, min(warmup_steps, total_steps))
    rest = max(1, total_steps - warmup_steps)
    if decay == "constant":
        after = optax.constant_schedule(peak)
    elif decay == "linear":
        after = optax.linear_schedule(peak, peak * end_factor, rest)
    else:
        after = optax.cosine_decay_schedule(peak, rest, alpha=end_factor)
    if warmup_steps == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), after], [warmup_steps])


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def path_labels(params: Any, fn) -> Any:
    """A tree of fn('a/b/kernel') over the params tree (for masks / multi_transform labels)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: fn(_path_str(p)), params)


def decay_mask(params: Any, exclude: str = r"(bias|scale|embedding|log_t|logit_bias)$") -> Any:
    """True where weight decay applies: not on biases, norm scales, embeddings or loss parameters."""
    rx = re.compile(exclude)
    return path_labels(params, lambda s: rx.search(s) is None)


def make_optimizer(cfg: Mapping[str, Any], total_steps: int, params: Any | None = None) -> optax.GradientTransformation:
    """cfg keys: name ('adamw'|'adafactor'), lr, warmup_steps, decay, end_factor, weight_decay, b1, b2, eps,
    clip_norm, freeze (regex over 'a/b/kernel' paths; matching params get no updates)."""
    name = cfg.get("name", "adamw")
    lr = schedule(float(cfg.get("lr", 1e-4)), total_steps, int(cfg.get("warmup_steps", 0)),
                  cfg.get("decay", "linear"), float(cfg.get("end_factor", 0.0)))
    wd = float(cfg.get("weight_decay", 0.0))
    if name == "adamw":
        opt = optax.adamw(lr, b1=float(cfg.get("b1", 0.9)), b2=float(cfg.get("b2", 0.999)),
                          eps=float(cfg.get("eps", 1e-8)), weight_decay=wd, mask=decay_mask if wd else None)
    elif name == "adafactor":
        opt = optax.adafactor(lr, weight_decay_rate=wd or None, weight_decay_mask=decay_mask if wd else None)
    else:
        raise ValueError(f"optimizer {name!r} is not supported; supported: adamw, adafactor")
    chain = []
    if cfg.get("clip_norm"):
        chain.append(optax.clip_by_global_norm(float(cfg["clip_norm"])))
    chain.append(opt)
    tx = optax.chain(*chain)
    freeze = cfg.get("freeze")
    if freeze:
        rx = re.compile(freeze)
        labels = lambda p: path_labels(p, lambda s: "frozen" if rx.search(s) else "train")  # noqa: E731
        if params is not None and not any(v == "frozen" for v in jax.tree.leaves(labels(params))):
            raise ValueError(f"freeze regex {freeze!r} matches no parameter")
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx
