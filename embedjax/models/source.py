"""Where a model starts, resolved in the models layer: `init_from` (a model folder, a hub id, or another
training run "WORKDIR[@STEP]") or `model_config` + `tokenizer` (random initialisation).

`init_from` a model folder plus `model_config` changes the head of the pretrained encoder (Sentence-T5's
projection on t5-base, another pooling, normalisation, separate towers started from the one pretrained tower):
`model_config` may then hold `head` (any of pooling, projection_dim, projection_bias, projection_activation,
normalize), `shared_towers` and `max_length`; the encoder comes from the checkpoint. Weights the new head has
and the checkpoint lacks (a new or resized projection) are initialised by the model's own initialisers, and
the run's config.json records the whole choice, so export and evaluation rebuild the same model.

    src = resolve(config)                    # ModelSource: config, pretrained params or None, tokenizer
    src.run                                  # (workdir, step) when starting from another run's checkpoint

The trainer, `embedjax aot` and export all ask here, so they agree on the architecture. Restoring another
run's checkpoint is the checkpoint layer's job (`src.run` says which); this module reads configs and weights
files only.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from embedjax.errors import ConfigError
from embedjax.models.dual_encoder import HeadConfig, ModelConfig, tower_params
from embedjax.models.layers import stack_layers

HEAD_KEYS = ("head", "shared_towers", "max_length", "encoder")   # what model_config may change on top of init_from
# encoder settings model_config may change on a pretrained checkpoint (the weights stay valid): a decoder LLM's
# attention mode, causal as pretrained or bidirectional as Gecko / EmbeddingGemma train it
ENCODER_KEYS = ("attention",)


@dataclasses.dataclass
class ModelSource:
    config: ModelConfig
    params: dict | None          # pretrained weights; None: random init, or `run`'s checkpoint holds them
    tokenizer: Any               # the Hugging Face tokenizer (None when not asked for)
    tokenizer_dir: Path | None   # the tokenizer files' folder (the TF tokenizer is built from it); None when
                                 # not asked for
    run: tuple[Any, int | None] | None = None   # init_from another run: (its workdir, step or None=latest)

    @property
    def description(self) -> str:
        return ("another run's checkpoint" if self.run else
                "pretrained weights" if self.params is not None else "random initialisation")


def _path(p: str) -> Any:
    from etils import epath   # local paths and gs:// alike

    return epath.Path(p)


def run_reference(init_from: str) -> tuple[Any, int | None] | None:
    """`init_from` naming another run's checkpoint: "WORKDIR" (its latest) or "WORKDIR@STEP" -> (workdir,
    step); None for a pretrained model folder / hub id."""
    path, _, step = str(init_from).partition("@")
    if "://" not in path:
        path = str(Path(path).absolute())
    p = _path(path)
    try:
        is_run = (p / "config.json").exists() and (p / "checkpoints").exists()
    except Exception:  # noqa: BLE001 - e.g. a hub id that is no path at all
        return None
    if not is_run:
        if step:
            raise ConfigError(f"init_from {init_from!r}: @STEP needs a training workdir (config.json + "
                              "checkpoints/)")
        return None
    if step and not step.isdigit():
        raise ConfigError(f"init_from {init_from!r}: the part after @ must be a step number")
    return p, (int(step) if step else None)


def with_head(cfg: ModelConfig, overrides: dict[str, Any], source: str) -> ModelConfig:
    """The pretrained model's config with `model_config`'s head / towers / max_length applied."""
    bad = sorted(set(overrides) - set(HEAD_KEYS))
    if bad:
        raise ConfigError(f"config: model_config.{bad[0]} cannot be set with init_from {source!r}: the checkpoint "
                          f"defines the encoder; with init_from, model_config may set {', '.join(HEAD_KEYS)}")
    enc_over = dict(overrides.get("encoder") or {})
    fields = {f.name for f in dataclasses.fields(cfg.encoder)}
    bad_enc = sorted(k for k in enc_over if k not in ENCODER_KEYS or k not in fields)
    if bad_enc:
        can = [k for k in ENCODER_KEYS if k in fields]
        raise ConfigError(f"config: model_config.encoder.{bad_enc[0]} cannot be set with init_from {source!r}: the "
                          f"checkpoint defines the encoder (a {cfg.architecture} encoder may change "
                          f"{', '.join(can) or 'nothing'})")
    if enc_over:
        try:
            cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, **enc_over))
        except ValueError as e:
            raise ConfigError(f"config: model_config.encoder: {e}") from None
    head = dict(overrides.get("head") or {})
    known = {f.name for f in dataclasses.fields(HeadConfig)}
    if set(head) - known:
        raise ConfigError(f"config: model_config.head.{sorted(set(head) - known)[0]} is not a head setting; "
                          f"known: {', '.join(sorted(known))}")
    try:
        new_head = HeadConfig(**{**dataclasses.asdict(cfg.head), **head})
    except ValueError as e:
        raise ConfigError(f"config: model_config.head: {e}") from None
    return dataclasses.replace(cfg, head=new_head, shared_towers=bool(overrides.get("shared_towers",
                                                                                       cfg.shared_towers)),
                               max_length=int(overrides.get("max_length", cfg.max_length)))


def carry_over(params: dict, old: ModelConfig, new: ModelConfig) -> dict:
    """The pretrained weights that fit the new head: the encoder always (in both towers when they are now
    separate), the projection when it keeps its shape and bias. What is left out is initialised fresh (a
    partial tree: `train_step.create_train_state` fills the rest)."""
    tower = tower_params(old, params)
    kept: dict[str, Any] = {"encoder": tower["encoder"]}
    if "projection" in tower and new.head.projection_dim == old.head.projection_dim \
            and new.head.projection_bias == old.head.projection_bias:
        kept["projection"] = tower["projection"]
    if new.shared_towers:
        return {"tower": kept}
    return {"query_tower": kept, "document_tower": dict(kept)}


def _long_enough(cfg: ModelConfig, config: Any) -> ModelConfig:
    max_len = max(config.max_query_length, config.max_document_length)
    return dataclasses.replace(cfg, max_length=max_len) if max_len > cfg.max_length else cfg


def resolve(config: Any, *, weights: bool = True, tokenizer: bool = True) -> ModelSource:
    """The model an experiment config starts from. `weights=False` reads configurations only (resume, AOT,
    export: the weights come from a checkpoint or are not needed); `tokenizer=False` skips loading it. The
    config's `dtype`, `dropout_rate` and `remat_policy` are set on the encoder config."""
    src = _resolve(config, weights=weights, tokenizer=tokenizer)
    src.config = with_runtime(src.config, config)
    if src.params is not None and src.config.encoder.scan_layers:   # pretrained layers into the scanned layout
        src.params = {k: dict(t, encoder=stack_layers(t["encoder"])) for k, t in src.params.items()}
    return src


def with_runtime(cfg: ModelConfig, config: Any) -> ModelConfig:
    """`cfg` with the training config's compute and parameter dtypes, dropout rate, remat policy and layer
    scanning on its encoder."""
    wanted = {"dtype": str(config.get("dtype", "float32")), "dropout_rate": float(config.get("dropout_rate", 0.0)),
              "remat": str(config.get("remat_policy", "none")),
              "param_dtype": str(config.get("param_dtype", "float32")),
              "scan_layers": bool(config.get("scan_layers", False))}
    defaults = {f.name: f.default for f in dataclasses.fields(cfg.encoder)}
    for field, want in wanted.items():   # a model config that sets one of these itself must agree with the key
        key = "remat_policy" if field == "remat" else field
        have = getattr(cfg.encoder, field, defaults.get(field))
        if field in defaults and have != defaults[field] and have != want:
            raise ConfigError(f"config: the model config's encoder {field}={have!r} differs from the top-level key "
                              f"{key}={want!r}, which decides it: set {key}={have!r} or leave "
                              f"{field} out of model_config")
    try:
        enc = dataclasses.replace(cfg.encoder, **wanted)
    except ValueError as e:
        raise ConfigError(f"config: {e}") from None
    return dataclasses.replace(cfg, encoder=enc)


def _resolve(config: Any, *, weights: bool, tokenizer: bool) -> ModelSource:
    from embedjax.config import read_workdir_config
    from embedjax.models.convert import load_folder, resolve_model_dir

    def tok(tdir: Path) -> Any:
        if not tokenizer:
            return None
        from embedjax.tokenize import load_tokenizer
        return load_tokenizer(tdir)

    if config.init_from:
        run = run_reference(config.init_from)
        overrides = dict(config.model_config.to_dict()) if config.model_config else {}
        if run is not None:
            run_config = read_workdir_config(run[0])
            if overrides and overrides != run_config.model_config.to_dict():
                raise ConfigError(f"config: model_config differs from that of the training run {config.init_from!r} "
                                  "it starts from (its config.json defines the model): leave it out or make it equal")
            src = resolve(run_config, weights=False, tokenizer=tokenizer)
            return ModelSource(_long_enough(src.config, config), None, src.tokenizer, src.tokenizer_dir, run)
        cfg, params, tdir, _ = load_folder(config.init_from, weights=weights, lazy=True)
        if overrides:
            new = with_head(cfg, overrides, config.init_from)
            params = None if params is None else carry_over(params, cfg, new)
            cfg = new
        return ModelSource(_long_enough(cfg, config), params, tok(tdir), tdir)
    cfg = ModelConfig.from_dict(config.model_config.to_dict())
    tdir = resolve_model_dir(config.tokenizer) if tokenizer else None
    return ModelSource(_long_enough(cfg, config), None, tok(tdir), tdir)
