"""What an export starts from: an `Encoder`, a model folder, or a training workdir (checkpoint or ``final/``).

`load_source(path)` returns an `ExportSource`: model config, params (numpy), the Hugging Face tokenizer, the
folder its files live in (the in-graph TF tokenizer is rebuilt from it), the prompts of each role and the
Matryoshka dims the model was trained with. For a workdir these come from what training used
(``config.json``: the tokenizer folder, ``data.query_prompt`` / ``data.document_prompt`` formatted by
`embedjax.data.prompts.Prompt` exactly as the seqio task did, ``loss.matryoshka_dims``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Union

import numpy as np

from embedjax import errors
from embedjax.data.prompts import Prompt, config_prompt
from embedjax.models.dual_encoder import ModelConfig

log = logging.getLogger(__name__)

# A role's prompt: a plain prefix (sentence-transformers / `Encoder.encode(prompt=...)` semantics: prefix +
# text), or a `Prompt` whose template is applied as in training (`Prompt.format_query` / `format_document`).
RolePrompt = Union[str, Prompt, None]


ExportError = errors.ExportError   # defined in embedjax/errors.py (one module of error types)


@dataclasses.dataclass
class ExportSource:
    """Everything an exporter needs, independent of where it came from."""

    config: ModelConfig
    params: dict                           # DualEncoder params tree (numpy or jax arrays)
    tokenizer: Any                         # the Hugging Face fast tokenizer
    tokenizer_dir: Path | None             # folder with the tokenizer files (vocab / spiece.model)
    query_prompt: RolePrompt = None
    document_prompt: RolePrompt = None
    matryoshka_dims: tuple[int, ...] = ()
    name: str = ""
    st_prompts: dict[str, str] = dataclasses.field(default_factory=dict)  # sentence-transformers prompts
    hf_config: dict | None = None
    step: int | None = None                # checkpoint step, when read from one
    whitening: tuple[np.ndarray, np.ndarray] | None = None   # (mean [D], matrix [D, k]) of `Encoder.fit_whitening`
    quantization_ranges: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)  # dim -> [2, dim]
    matryoshka_layers: tuple[int, ...] = ()  # 2D Matryoshka layer counts the model was trained with

    def encoder(self) -> Any:
        """An `embedjax.Encoder` over the same params and tokenizer (the JAX reference)."""
        from embedjax.encoder import Encoder

        prompt = self.query_prompt if isinstance(self.query_prompt, Prompt) else None
        enc = Encoder(self.config, self.params, self.tokenizer, name=self.name, prompts=self.st_prompts,
                      hf_config=self.hf_config, prompt=prompt)
        enc.whitening = self.whitening
        enc.quantization_ranges = dict(self.quantization_ranges)
        return enc


def format_text(prompt: RolePrompt, role: str, text: str) -> str:
    """The Python twin of the in-graph prompt formatting (used for reference embeddings and warmup texts)."""
    if prompt is None or prompt == "":
        return text
    if isinstance(prompt, str):
        return prompt + text
    return prompt.format_query(text) if role == "query" else prompt.format_document(text)


def is_workdir(path: str | os.PathLike) -> bool:
    """A training workdir: ``config.json`` of an experiment plus ``checkpoints/`` or ``final/``."""
    p = Path(path)
    if not (p / "config.json").is_file() or not ((p / "checkpoints").is_dir() or (p / "final").is_dir()):
        return False
    try:
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(cfg, dict) and ("model_config" in cfg or "init_from" in cfg)


def load_source(path_or_encoder: Any, *, step: int | None = None,
                use_final: bool | None = None) -> ExportSource:
    """An `ExportSource` from an `Encoder`, a model folder / hub id, or a training workdir.

    Workdir: the latest checkpoint (or `step`) when ``checkpoints/`` holds one, else ``final/``;
    `use_final=True` forces ``final/``.
    """
    from embedjax.encoder import Encoder

    if isinstance(path_or_encoder, Encoder):
        enc = path_or_encoder
        tdir = Path(enc.name) if enc.name and Path(enc.name).is_dir() else None
        return _from_encoder(enc, tdir)
    if isinstance(path_or_encoder, ExportSource):
        return path_or_encoder
    path = Path(path_or_encoder)
    if is_workdir(path):
        return _from_workdir(path, step=step, use_final=use_final)
    if step is not None:
        raise ExportError(f"{path}: --step needs a training workdir (config.json + checkpoints/)")
    return _from_encoder(Encoder.load(path_or_encoder), _model_dir_or_none(path_or_encoder))


def _model_dir_or_none(path_or_id: Any) -> Path | None:
    from embedjax.models.convert import resolve_model_dir

    try:
        return Path(resolve_model_dir(path_or_id))
    except Exception:  # noqa: BLE001 - only used to find tokenizer files; the Encoder already loaded
        return None


def _from_encoder(enc: Any, model_dir: Path | None) -> ExportSource:
    prompts = dict(enc.prompts)
    doc = prompts.get("document", prompts.get("passage"))
    tdir = None
    if model_dir is not None:
        from embedjax.data.tf_tokenize import find_tokenizer_dir
        try:
            tdir = find_tokenizer_dir(model_dir)
        except FileNotFoundError:
            tdir = None
    return ExportSource(config=enc.config, params=enc.params, tokenizer=enc.tokenizer, tokenizer_dir=tdir,
                        query_prompt=prompts.get("query") or None, document_prompt=doc or None,
                        name=enc.name, st_prompts=prompts, hf_config=getattr(enc, "_hf_config", None),
                        whitening=getattr(enc, "whitening", None),
                        quantization_ranges=dict(getattr(enc, "quantization_ranges", {}) or {}))


def _read_workdir_config(workdir: Path) -> Any:
    from embedjax.config import ConfigError, read_workdir_config

    try:
        return read_workdir_config(workdir)
    except ConfigError as e:
        raise ExportError(str(e)) from None


def _training_prompt(cfg: Any) -> Prompt | None:
    """The Prompt the trainer built from ``data.query_prompt`` / ``data.document_prompt``."""
    return config_prompt(cfg.data)


def _from_workdir(workdir: Path, *, step: int | None, use_final: bool | None) -> ExportSource:
    from embedjax.encoder import Encoder

    cfg = _read_workdir_config(workdir)
    prompt = _training_prompt(cfg)
    dims = tuple(int(d) for d in (cfg.loss.get("matryoshka_dims") or ()))
    layers = tuple(int(n) for n in (cfg.loss.get("matryoshka_layers") or ()))
    tok_ref = cfg.get("tokenizer") or cfg.get("init_from") or ""
    tdir = None
    if tok_ref:
        tdir = _model_dir_or_none(tok_ref)
        if tdir is not None:
            from embedjax.data.tf_tokenize import find_tokenizer_dir
            try:
                tdir = find_tokenizer_dir(tdir)
            except FileNotFoundError:
                tdir = None
    ckpt_dir = workdir / "checkpoints"
    has_ckpt = ckpt_dir.is_dir() and any(c.name.isdigit() for c in ckpt_dir.iterdir())
    final = workdir / "final"
    if use_final or (not has_ckpt and step is None):
        if not final.is_dir():
            raise ExportError(f"{workdir}: no final/ model folder (and no checkpoint in {ckpt_dir})")
        enc = Encoder.load(final)
        src = _from_encoder(enc, final)
        if tdir is not None:   # the tokenizer folder training read (final/ may lack spiece.model)
            src.tokenizer_dir = tdir
        src.query_prompt = src.query_prompt or (prompt if prompt else None)
        src.document_prompt = src.document_prompt or (prompt if prompt else None)
        src.matryoshka_dims = dims
        src.matryoshka_layers = layers
        src.name = str(workdir)
        return src
    if not has_ckpt:
        raise ExportError(f"{workdir}: no checkpoint in {ckpt_dir}")
    model_cfg, params, tokenizer, model_dir, step = restore_params(workdir, cfg, step)
    if tdir is None:
        tdir = Path(model_dir)
    return ExportSource(config=model_cfg, params=params, tokenizer=tokenizer, tokenizer_dir=tdir,
                        query_prompt=prompt, document_prompt=prompt, matryoshka_dims=dims,
                        matryoshka_layers=layers, name=f"{workdir}@{step}", step=step)


def restore_params(workdir: Path, cfg: Any,
                   step: int | None = None) -> tuple[ModelConfig, dict, Any, Path, int]:
    """(model config, model params as numpy, tokenizer, tokenizer folder, step) from a workdir checkpoint.

    Only the model's params are read (`abstract_model_params`, nothing allocated, no optimizer built; never
    the optimizer state), onto this host's first device, whatever mesh training used.
    """
    import jax

    from embedjax import sharding
    from embedjax.checkpoint import Checkpointer
    from embedjax.lora import from_config, init_adapters, merge
    from embedjax.train_step import abstract_model_params
    from embedjax.models.source import resolve

    src = resolve(cfg, weights=False)
    model_cfg, tokenizer, model_dir = src.config, src.tokenizer, src.tokenizer_dir
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False, read_only=True)
    try:
        step = ckpt.latest_step() if step is None else int(step)
        if step is None:
            raise ExportError(f"{workdir / 'checkpoints'}: no checkpoint")
        mesh = sharding.single_device_mesh()
        abstract_model = abstract_model_params(model_cfg, mesh)
        target = {"model": abstract_model}
        lora = from_config(cfg)
        if lora.enabled:   # adapters trained beside the frozen model: read them too, then merge
            target["lora"] = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding.replicated(mesh)),
                jax.eval_shape(lambda r: init_adapters(lora, abstract_model, r), jax.random.key(0)))
        try:   # the model's params only: no optimizer is built and its state is never read
            state, step = ckpt.restore_subtree({"params": target}, step=step)
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise ExportError(f"{workdir / 'checkpoints'}: cannot restore step {step} "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    finally:
        ckpt.close()
    restored = state["params"]
    merged = merge(restored["model"], restored["lora"], lora.scale) if lora.enabled else restored["model"]
    params = jax.tree.map(lambda x: np.asarray(x), merged)
    return model_cfg, params, tokenizer, Path(model_dir), int(step)
