"""An ``mteb`` encoder around an embedjax encoder, so users can run MTEB tasks when they have the data.

Written against mteb 2.x (checked with 2.26.24), whose ``EncoderProtocol.encode`` receives a torch
``DataLoader`` of batches (dicts with a ``"text"`` list) plus ``task_metadata``, ``hf_split``, ``hf_subset`` and
``prompt_type`` (``PromptType.query`` / ``PromptType.document``, None for symmetric tasks such as STS)::

    import mteb
    from embedjax import Encoder
    from embedjax.evaluate.mteb_adapter import MTEBEncoder

    model = MTEBEncoder(Encoder.load(path), query_prompt="query: ", document_prompt="passage: ")
    results = mteb.evaluate(model, mteb.get_tasks(tasks=["SciFact"]), cache=None)

mteb is an optional dependency: importing this module without it raises an ImportError that says so.
"""

from __future__ import annotations

from typing import Any

import numpy as np

try:
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction
    from mteb.types import PromptType
except ImportError as e:  # pragma: no cover - exercised only without mteb
    raise ImportError(
        "embedjax.evaluate.mteb_adapter needs the 'mteb' package (pip install 'mteb>=2.26')"
    ) from e


class MTEBEncoder(AbsEncoder):
    """Implements mteb's ``EncoderProtocol`` for an object with the ``embedjax.Encoder`` API.

    Prompts: ``model_prompts`` uses mteb's own lookup (keys: task name, task type, ``"query"`` /
    ``"document"``, or ``"{task}-{query|document}"``); otherwise ``query_prompt`` / ``document_prompt`` are
    used for retrieval queries / documents and nothing for symmetric tasks. ``prompt_type=document`` selects
    the encoder's document tower, anything else the query tower. Similarity is cosine unless
    ``similarity="dot"``.
    """

    def __init__(
        self,
        encoder: Any,
        batch_size: int = 128,
        max_length: int | None = None,
        query_prompt: str | None = None,
        document_prompt: str | None = None,
        model_prompts: dict[str, str] | None = None,
        name: str | None = None,
        similarity: str = "cosine",
        show_progress: bool = False,
    ) -> None:
        self.model = encoder
        self.batch_size = batch_size
        self.max_length = max_length
        self.query_prompt = query_prompt
        self.document_prompt = document_prompt
        self.model_prompts = self.validate_task_to_prompt_name(model_prompts) if model_prompts else None
        self.show_progress = show_progress
        fingerprint = getattr(encoder, "fingerprint", None)
        model_name = name or getattr(encoder, "name", None) or "embedjax/model"
        if "/" not in model_name:  # mteb expects "organization/model"
            model_name = f"embedjax/{model_name}"
        self.mteb_model_meta = ModelMeta.create_empty(
            overwrites={
                "name": model_name,
                "revision": str(fingerprint)[:40] if fingerprint else None,
                "max_tokens": getattr(encoder, "max_length", None),
                "similarity_fn_name": ScoringFunction.COSINE if similarity == "cosine" else ScoringFunction.DOT_PRODUCT,
                "framework": ["JAX"],
                "use_instructions": bool(query_prompt or document_prompt or model_prompts),
            }
        )

    def _prompt(self, task_metadata: Any, prompt_type: PromptType | None) -> str | None:
        if self.model_prompts:
            prompt_name = self.get_prompt_name(task_metadata, prompt_type)
            if prompt_name:
                return self.model_prompts.get(prompt_name)
        if prompt_type == PromptType.query:
            return self.query_prompt
        if prompt_type == PromptType.document:
            return self.document_prompt
        return None

    def encode(
        self,
        inputs: Any,
        *,
        task_metadata: Any,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Embeds every ``batch["text"]`` of the mteb DataLoader; returns float32 ``[N, D]``."""
        prompt = self._prompt(task_metadata, prompt_type)
        tower = "document" if prompt_type == PromptType.document else "query"
        batch_size = int(kwargs.get("batch_size") or self.batch_size)
        out: list[np.ndarray] = []
        for batch in inputs:
            texts = batch["text"] if isinstance(batch, dict) else batch
            if not texts:
                continue
            emb = self.model.encode(
                [str(t) for t in texts],
                batch_size=batch_size,
                max_length=self.max_length,
                prompt=prompt,
                tower=tower,
                show_progress=self.show_progress,
            )
            out.append(np.asarray(emb, dtype=np.float32))
        if not out:
            raise ValueError(f"mteb gave no texts to encode for task {getattr(task_metadata, 'name', '?')}")
        return np.concatenate(out, axis=0)
