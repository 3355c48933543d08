"""Write a sentence-transformers folder from a training workdir (a checkpoint or ``final/``), a model folder
or an `Encoder`: the format `SentenceTransformer(path)` and `Encoder.load(path)` read.

    export_sentence_transformers("/runs/tiny", "/models/tiny-st")             # latest checkpoint
    export_sentence_transformers("/runs/tiny", "/models/tiny-st-500", step=500)

Training prompts with a prefix form (`Prompt.prefix`: "query: ", "task: search result | query: ", an untitled
document's "title: none | text: ") become the folder's ``prompts`` (``config_sentence_transformers.json``);
templates without one cannot be expressed there and are left out (with a warning). A SentencePiece tokenizer's ``spiece.model`` is copied along when the tokenizer folder
has it.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from embedjax.data.prompts import Prompt
from embedjax.export.source import ExportError, RolePrompt, load_source

log = logging.getLogger(__name__)

_SP_FILES = ("spiece.model", "tokenizer.model", "sentencepiece.bpe.model", "sentencepiece.model")


def _as_prefix(prompt: RolePrompt, role: str) -> str | None:
    """A role prompt as a sentence-transformers prefix, or None when it is not a plain prefix."""
    if prompt is None or prompt == "":
        return None
    if isinstance(prompt, str):
        return prompt
    assert isinstance(prompt, Prompt)
    prefix = prompt.prefix(role)
    if prefix is None:
        log.warning("the %s prompt template %r has no prefix form; it is not written to the "
                    "sentence-transformers folder (apply it yourself when encoding)", role,
                    prompt.query if role == "query" else prompt.document)
    return prefix or None


def export_sentence_transformers(model: Any, output_dir: str | os.PathLike, *, step: int | None = None,
                                 overwrite: bool = False) -> Path:
    """Writes the sentence-transformers folder of `model` (workdir / folder / `Encoder`) to `output_dir`."""
    from embedjax.models.convert import save_sentence_transformers

    out = Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"{out}: already exists and is not empty (pass overwrite=True / --overwrite)")
    src = load_source(model, step=step)
    if not src.config.shared_towers:
        raise ExportError(f"{src.name}: a model with separate query / document towers has no single "
                          "sentence-transformers form; export it as a SavedModel (query / document "
                          "signatures)")
    prompts = dict(src.st_prompts)
    for role, key in (("query", "query"), ("document", "document")):
        prefix = _as_prefix(src.query_prompt if role == "query" else src.document_prompt, role)
        if prefix is not None:
            prompts.setdefault(key, prefix)
    if out.exists() and overwrite:
        shutil.rmtree(out)
    save_sentence_transformers(out, src.config, src.params, src.tokenizer, prompts=prompts,
                               hf_config=src.hf_config)
    if src.tokenizer_dir is not None:
        for name in _SP_FILES:
            f = Path(src.tokenizer_dir) / name
            if f.is_file() and not (out / name).exists():
                shutil.copy2(f, out / name)
    log.info("wrote sentence-transformers folder %s from %s", out, src.name)
    return out
