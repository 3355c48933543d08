"""Experiment configs: Python files under configs/ exposing `get_config(arg: str | None) -> ConfigDict`
(big_vision style), loaded with an optional `:variant` suffix and dotted command-line overrides.

    cfg = load_config("configs/minilm_scifact.py:tiny", ["optim.lr=3e-5", "batch_size=16"])

No jax import here.
"""
from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path
from typing import Any, Sequence

import ml_collections

ConfigDict = ml_collections.ConfigDict


class ConfigError(ValueError):
    pass


def base_config() -> ConfigDict:
    """Every key a training config may set, with defaults. Configs start from this."""
    c = ConfigDict()
    c.seed = 0
    # model: a pretrained folder / hub id (init_from) or an architecture from scratch (model_config + tokenizer)
    c.init_from = ""                       # pretrained folder / hub id, or another run: "WORKDIR[@STEP]"
    c.model_config = ConfigDict()          # ModelConfig.to_dict() layout, used when init_from is empty
    c.tokenizer = ""                       # folder with tokenizer files (scratch models)
    c.max_query_length = 64
    c.max_document_length = 256
    # data
    c.data = ConfigDict()
    c.data.kind = "beir"                   # beir | pairs | stsb
    c.data.path = ""                       # folder (beir) or file (pairs / stsb)
    c.data.split = "train"
    c.data.query_prompt = ""
    c.data.document_prompt = ""
    c.data.num_negatives = 0
    c.data.on_error = "raise"
    c.data.host_order = "per_host"         # per_host: each host reads its shard | global: every host reads all
                                           # data and takes its rows of one global order (host-count invariant)
    c.batch_size = 32                      # global
    c.num_steps = 100
    # loss
    c.loss = ConfigDict()
    c.loss.name = "in_batch_softmax"       # in_batch_softmax | sigmoid | cosent | angle
    c.loss.temperature = 0.05
    c.loss.learn_temperature = False
    c.loss.bidirectional = True
    c.loss.same_tower = False
    c.loss.margin = 0.0
    c.loss.scale = 20.0                    # cosent / angle
    c.loss.matryoshka_dims = ()
    c.loss.matryoshka_weights = ()
    # optimizer
    c.optim = ConfigDict()
    c.optim.name = "adamw"
    c.optim.lr = 2e-5
    c.optim.warmup_steps = 10
    c.optim.decay = "linear"
    c.optim.end_factor = 0.0
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0
    c.optim.freeze = ""
    c.grad_cache_chunks = 0                # >1: gradient caching with this many chunks per global batch
    # parallelism
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # evaluation / logging / checkpoints
    c.eval = ConfigDict()
    c.eval.tasks = ()                      # tuple of "kind:path[:split]" e.g. "beir:embedjax/data/shipped/scifact:test"
    c.eval.every_steps = 0                 # 0: only before and after training
    c.eval.batch_size = 128
    c.eval.before = True
    c.log_every_steps = 10
    c.checkpoint_every_steps = 0           # 0: only at the end
    c.keep_checkpoints = 3                 # the last K
    c.keep_best_checkpoints = 0            # plus the best N by best_metric (saved at eval steps)
    c.best_metric = ""                     # e.g. "beir/scifact/test/ndcg@10" (an eval metric name)
    c.best_mode = "max"
    c.export_final = True                  # write <workdir>/final as a sentence-transformers folder
    return c


def load_config(spec: str, overrides: Sequence[str] = ()) -> ConfigDict:
    """`path/to/config.py[:arg]` -> ConfigDict, with `key.sub=value` overrides applied (values parsed as Python
    literals when they parse, else kept as strings)."""
    path, _, arg = spec.partition(":")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: no such config file")
    mod_spec = importlib.util.spec_from_file_location(f"embedjax_config_{p.stem}", p)
    mod = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(mod)
    except Exception as e:
        raise ConfigError(f"{path}: failed to load ({type(e).__name__}: {e})") from e
    if not hasattr(mod, "get_config"):
        raise ConfigError(f"{path}: defines no get_config()")
    cfg = mod.get_config(arg or None)
    for o in overrides:
        apply_override(cfg, o)
    validate(cfg)
    return cfg


def parse_value(v: str) -> Any:
    try:
        return ast.literal_eval(v)
    except (ValueError, SyntaxError):
        return v


def apply_override(cfg: ConfigDict, override: str) -> None:
    key, eq, value = override.partition("=")
    if not eq:
        raise ConfigError(f"override {override!r}: expected key=value")
    key = key.strip().removeprefix("--").removeprefix("config.")
    node = cfg
    parts = key.split(".")
    for k in parts[:-1]:
        if k not in node:
            raise ConfigError(f"override {override!r}: unknown key {key!r}")
        node = node[k]
    if parts[-1] not in node:
        raise ConfigError(f"override {override!r}: unknown key {key!r}")
    old = node[parts[-1]]
    new = parse_value(value)
    if isinstance(old, float) and isinstance(new, int):
        new = float(new)
    if isinstance(old, tuple) and isinstance(new, list):
        new = tuple(new)
    try:
        node[parts[-1]] = new
    except TypeError as e:
        raise ConfigError(f"override {override!r}: {e}") from e


def validate(cfg: ConfigDict) -> None:
    if not cfg.init_from and not cfg.model_config:
        raise ConfigError("config: set init_from (a pretrained model) or model_config (from scratch)")
    if cfg.batch_size < 1 or cfg.num_steps < 0:
        raise ConfigError(f"config: batch_size must be >= 1 and num_steps >= 0 (got {cfg.batch_size}, {cfg.num_steps})")
    if cfg.grad_cache_chunks and cfg.batch_size % cfg.grad_cache_chunks:
        raise ConfigError(f"config: batch_size {cfg.batch_size} is not divisible by grad_cache_chunks "
                          f"{cfg.grad_cache_chunks}")
    if cfg.data.kind not in ("beir", "pairs", "stsb"):
        raise ConfigError(f"config: data.kind {cfg.data.kind!r} is not one of beir, pairs, stsb")
    if cfg.get("keep_best_checkpoints", 0) and not cfg.get("best_metric"):
        raise ConfigError("config: keep_best_checkpoints needs best_metric (an eval metric name, e.g. "
                          "'beir/scifact/test/ndcg@10')")
    if cfg.get("best_mode", "max") not in ("max", "min"):
        raise ConfigError(f"config: best_mode must be 'max' or 'min', got {cfg.best_mode!r}")
    if cfg.data.get("host_order", "per_host") not in ("per_host", "global"):
        raise ConfigError(f"config: data.host_order must be 'per_host' or 'global', got {cfg.data.host_order!r}")
    dims = tuple(cfg.loss.matryoshka_dims)
    if dims and list(dims) != sorted(dims, reverse=True):
        raise ConfigError(f"config: loss.matryoshka_dims must be decreasing, got {dims}")


def read_workdir_config(workdir: Any) -> ConfigDict:
    """The experiment config a training run wrote to ``<workdir>/config.json``, over today's defaults."""
    if "://" in str(workdir):
        from etils import epath
        path = epath.Path(str(workdir)) / "config.json"
    else:
        path = Path(workdir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (not a training workdir)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    cfg = base_config()
    _merge(cfg, raw)
    return cfg


def _merge(cfg: Any, raw: dict) -> None:
    """Overlays a config.json dict on the base config (nested ConfigDicts kept; lists become tuples)."""
    for k, v in raw.items():
        if isinstance(v, dict) and k in cfg and isinstance(cfg[k], ConfigDict) and k != "model_config":
            _merge(cfg[k], v)
        elif isinstance(v, dict):
            cfg[k] = ConfigDict(v)
        elif isinstance(v, list):
            cfg[k] = tuple(v)
        else:
            try:
                cfg[k] = v
            except TypeError:  # a field whose type changed (e.g. None default): replace
                del cfg[k]
                cfg[k] = v


