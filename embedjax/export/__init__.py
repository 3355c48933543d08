"""Export: a TF Serving SavedModel (`export_saved_model`) or a sentence-transformers folder
(`export_sentence_transformers`) from an `Encoder`, a model folder or a training workdir. TensorFlow is
imported only when a SavedModel is written or loaded."""
from __future__ import annotations

__all__ = ["ExportError", "SavedModelEncoder", "export_saved_model", "export_sentence_transformers",
           "load_source"]


def __getattr__(name: str):
    if name in ("export_saved_model", "SavedModelEncoder"):
        from embedjax.export import saved_model
        return getattr(saved_model, name)
    if name == "export_sentence_transformers":
        from embedjax.export.sentence_transformers import export_sentence_transformers
        return export_sentence_transformers
    if name in ("ExportError", "load_source"):
        from embedjax.export import source
        return getattr(source, name)
    raise AttributeError(f"module 'embedjax.export' has no attribute {name!r}")
