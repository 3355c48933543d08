"""embedjax: train, evaluate and serve text-embedding models with JAX / Flax."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Encoder", "__version__"]

from embedjax.quiet import quiet_startup as _quiet_startup  # noqa: E402

_quiet_startup()   # library noise off before TF / JAX start (embedjax -v or EMBEDJAX_VERBOSE=1 keeps it)


def __getattr__(name: str):
    # Lazy: `import embedjax` stays cheap (no jax import) for the CLI's --help and for config files.
    if name == "Encoder":
        from embedjax.encoder import Encoder
        return Encoder
    raise AttributeError(f"module 'embedjax' has no attribute {name!r}")
