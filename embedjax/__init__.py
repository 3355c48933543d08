"""embedjax: train, evaluate and serve text-embedding models with JAX / Flax."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Encoder", "__version__"]

import os as _os

# gs:// (workdirs, checkpoints' metadata, data files) goes through etils.epath's fsspec backend, i.e. gcsfs, and
# not through tf.io.gfile, which epath would pick whenever TensorFlow is installed: gcsfs takes the same Google
# application-default credentials, honours STORAGE_EMULATOR_HOST (how the tests reach a local GCS emulator; TF's
# GCS client has its endpoints compiled in) and needs no TensorFlow. EPATH_USE_TF=1 set by the user keeps gfile.
# Orbax's arrays go through tensorstore's own GCS driver either way.
_os.environ.setdefault("EPATH_USE_TF", "false")

from embedjax.quiet import quiet_startup as _quiet_startup  # noqa: E402

_quiet_startup()   # library noise off before TF / JAX start (embedjax -v or EMBEDJAX_VERBOSE=1 keeps it)


def __getattr__(name: str):
    # Lazy: `import embedjax` stays cheap (no jax import) for the CLI's --help and for config files.
    if name == "Encoder":
        from embedjax.encoder import Encoder
        return Encoder
    raise AttributeError(f"module 'embedjax' has no attribute {name!r}")
