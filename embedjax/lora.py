"""LoRA (Hu et al. 2021): rank-r adapters beside chosen weight matrices, the base weights frozen.

For every `Dense` kernel whose parameter path (``tower/encoder/layer_0/query/kernel``) matches `LoraConfig.targets`,
the layer computes ``x @ W + (alpha / rank) * (x @ A) @ B`` with ``A`` [in, r] (initialised as PEFT does,
uniform in +-1/sqrt(in)) and ``B`` [r, out] (zeros, so training starts from the base model). The adapters live
in their own tree, ``params["lora"]``, shaped like the model's (``{"tower": {"encoder": {"layer_0": {"query":
{"a": ..., "b": ...}}}}}``); the train step differentiates and optimises only that tree (and the loss's own
parameters): the base weights get no gradient computation beyond what flows through them to earlier layers, and
no optimizer state. The model's modules are unchanged: the low-rank path is added by intercepting `Dense` calls
(`flax.linen.intercept_methods`) while the model is applied (`apply`).

`merge` folds the adapters into the weights (``W + (alpha / rank) * A @ B``): the model that is evaluated during
training, saved and exported is an ordinary one.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from flax import traverse_util

from embedjax.models.layers import Dense

from embedjax.config import LORA_TARGETS as DEFAULT_TARGETS


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 0                  # 0: off
    alpha: float = 16.0            # the adapters' output is scaled by alpha / rank
    targets: str = DEFAULT_TARGETS  # regex over Dense kernel paths such as 'tower/encoder/layer_0/query/kernel'

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"lora.rank must be an integer >= 0, got {self.rank!r}")
        if self.rank and not float(self.alpha) > 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha!r}")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ValueError(f"lora.targets {self.targets!r} is not a valid regex ({e})") from None

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank


def target_paths(cfg: LoraConfig, model_params: Any) -> list[str]:
    """The module paths ('tower/encoder/layer_0/query') whose kernel gets an adapter; error if none."""
    rx = re.compile(cfg.targets)
    flat = traverse_util.flatten_dict(model_params, sep="/")
    out = [k[: -len("/kernel")] for k, v in flat.items()
           if k.endswith("/kernel") and len(np.shape(v)) == 2 and rx.search(k)]
    if not out:
        kernels = [k for k in flat if k.endswith("/kernel")][:4]
        raise ValueError(f"lora.targets {cfg.targets!r} matches no 2-D Dense kernel (kernel paths look like "
                         f"{kernels}; scanned layers, whose kernels are 3-D, are not supported with LoRA)")
    return sorted(out)


def init_adapters(cfg: LoraConfig, model_params: Any, rng: jax.Array) -> dict:
    """{path...: {"a": [in, r], "b": [r, out]}} (float32) for every target of `model_params` (arrays or
    ShapeDtypeStructs)."""
    flat = traverse_util.flatten_dict(model_params, sep="/")
    out: dict[str, Any] = {}
    for i, path in enumerate(target_paths(cfg, model_params)):
        d_in, d_out = np.shape(flat[path + "/kernel"])
        bound = 1.0 / math.sqrt(d_in)
        out[path + "/a"] = jax.random.uniform(jax.random.fold_in(rng, i), (d_in, cfg.rank), jnp.float32,
                                              -bound, bound)
        out[path + "/b"] = jnp.zeros((cfg.rank, d_out), jnp.float32)
    return traverse_util.unflatten_dict(out, sep="/")


def _interceptor(adapters: dict, scale: float) -> Callable:
    flat = traverse_util.flatten_dict(adapters, sep="/")
    by_path = {k[: -len("/a")]: (v, flat[k[: -len("/a")] + "/b"]) for k, v in flat.items() if k.endswith("/a")}

    def intercept(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        if context.method_name != "__call__" or not isinstance(context.module, Dense):
            return y
        ab = by_path.get("/".join(context.module.path))
        if ab is None:
            return y
        a, b = ab
        dtype = y.dtype
        x = args[0].astype(dtype)
        return y + (scale * ((x @ a.astype(dtype)) @ b.astype(dtype))).astype(dtype)

    return intercept


def apply(module: nn.Module, model_params: Any, adapters: dict, scale: float, *args: Any, **kwargs: Any) -> Any:
    """`module.apply({"params": model_params}, *args, **kwargs)` with the adapters' low-rank paths added."""
    with nn.intercept_methods(_interceptor(adapters, scale)):
        return module.apply({"params": model_params}, *args, **kwargs)


def merge(model_params: Any, adapters: dict, scale: float) -> Any:
    """The model's params with every adapter folded in: ``W + scale * A @ B`` (in the kernel's dtype)."""
    flat = traverse_util.flatten_dict(model_params, sep="/")
    ad = traverse_util.flatten_dict(adapters, sep="/")
    out = dict(flat)
    for k, a in ad.items():
        if not k.endswith("/a"):
            continue
        path = k[: -len("/a")]
        w = flat[path + "/kernel"]
        delta = scale * (jnp.asarray(a, jnp.float32) @ jnp.asarray(ad[path + "/b"], jnp.float32))
        out[path + "/kernel"] = (jnp.asarray(w, jnp.float32) + delta).astype(jnp.asarray(w).dtype)
    return traverse_util.unflatten_dict(out, sep="/")


def from_config(c: Any) -> LoraConfig:
    """The `lora` section of an experiment config (absent or rank 0: off)."""
    sec = c.get("lora") if hasattr(c, "get") else None
    if not sec:
        return LoraConfig()
    return LoraConfig(rank=int(sec.get("rank", 0)), alpha=float(sec.get("alpha", 16.0)),
                      targets=str(sec.get("targets", DEFAULT_TARGETS)))
