"""Quiet start-up: only embedjax's own lines and its progress by default.

What it silences, before TensorFlow / JAX / transformers start (the CLI calls it first thing; `import embedjax`
calls it too, so the Python API is as quiet):

* TensorFlow's C++ log lines (oneDNN and CPU-feature notices, ``cudart_stub`` and ``failed call to cuInit``
  on a machine without CUDA, absl's "All log messages before absl::InitializeLog()"). TensorFlow 2.21 writes
  them to file descriptor 2 before its log level applies, so ``TF_CPP_MIN_LOG_LEVEL=3`` is not enough: the first
  ``import tensorflow`` (and its device probe, done right after) runs with fd 2 captured, and what was written
  there is replayed except the lines `NOISE` matches. `captured_native_stderr()` does the same around other
  phases that start native libraries (TFDS dataset preparation);
* libtpu's probing when the libtpu package is installed but the machine has no TPU chip (``Failed to find host
  bounds``, ``TPU_WORKER_HOSTNAMES``, a ``Source Location Trace``): JAX is told the platforms that exist here
  (``JAX_PLATFORMS=cpu``, or ``cuda,cpu`` with a visible NVIDIA GPU and the CUDA plugin), as it would fall
  back to them anyway after the failed TPU probe;
* transformers' advisory "PyTorch was not found" (``TRANSFORMERS_NO_ADVISORY_WARNINGS``);
* absl (TFDS) warnings such as "Using custom data configuration: LocalFilesConfig(...)", and TFDS's progress
  bars and "Downloading and preparing dataset" banner for local files (`embedjax.data.tfds_builders` logs one
  line of its own instead).

Every setting is a default: a variable the user set is left alone. ``embedjax -v`` (or
``EMBEDJAX_VERBOSE=1``) skips all of it.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile

_done = False
_set: list[str] = []   # the environment variables quiet_startup set (loud() takes them back)


def verbose_requested() -> bool:
    return os.environ.get("EMBEDJAX_VERBOSE", "") not in ("", "0")


def no_tpu_here() -> bool:
    """True only when this machine certainly has no TPU: no Google PCI device at all (a TPU VM's chips are
    Google PCI devices, vendor 0x1ae0) and no /dev/accel* or /dev/vfio. Read from /sys without importing JAX.
    A GCE VM with other Google devices (gVNIC) counts as 'cannot tell' and JAX is left to probe."""
    import glob

    if glob.glob("/dev/accel*") or os.path.exists("/dev/vfio"):
        return False
    vendors = glob.glob("/sys/bus/pci/devices/*/vendor")
    if not vendors:
        return False   # no PCI view (not Linux, a sandbox): cannot tell
    try:
        return all(open(v, encoding="ascii").read().strip() != "0x1ae0" for v in vendors)
    except OSError:
        return False


def _platforms_without_tpu() -> str:
    gpu = any(os.path.exists(d) for d in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg"))
    cuda = any(importlib.util.find_spec(m) is not None for m in ("jax_cuda13_plugin", "jax_cuda12_plugin"))
    return "cuda,cpu" if gpu and cuda else "cpu"


def quiet_startup(verbose: bool | None = None) -> None:
    """Applies the defaults above once per process (before TensorFlow and JAX start, where possible)."""
    global _done
    if verbose is None:
        verbose = verbose_requested()
    if verbose or _done:
        return
    _done = True

    def default(key: str, value: str) -> None:
        if key not in os.environ:
            os.environ[key] = value
            _set.append(key)

    default("TF_CPP_MIN_LOG_LEVEL", "2")
    default("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if "JAX_PLATFORMS" not in os.environ and importlib.util.find_spec("libtpu") is not None and no_tpu_here():
        platforms = _platforms_without_tpu()
        default("JAX_PLATFORMS", platforms)
        if "jax" in sys.modules:   # imported before embedjax: set it on the config too (backends start lazily)
            sys.modules["jax"].config.update("jax_platforms", platforms)
    logging.getLogger("absl").setLevel(logging.ERROR)
    if "tensorflow" not in sys.modules:
        sys.meta_path.insert(0, _QuietTensorFlowImport())


# Native (C++) lines that say nothing to an embedjax user: absl-format INFO / WARNING lines, and the known
# harmless errors of a machine without CUDA or of oneDNN's feature checks.
NOISE = re.compile(
    r"^(?:[IW]\d{4} [\d:.]+\s+\d+ \S+:\d+\] "
    r"|E\d{4} [\d:.]+\s+\d+ \S+:\d+\] (?:failed call to cuInit|oneDNN supports|Unable to register "
    r"cu(?:DNN|FFT|BLAS) factory|computation placer already registered)"
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|WARNING: Logging before InitGoogle\(\) is written to STDERR"
    r"|To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.)")


@contextlib.contextmanager
def captured_native_stderr():
    """File descriptor 2 goes to a temporary file for the duration; afterwards every line that is not `NOISE`
    is written to stderr (in order; Python's own lines written meanwhile included)."""
    if verbose_requested():
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, AttributeError, ValueError):   # no usable fd 2 (embedded interpreters): nothing to do
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (AttributeError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not NOISE.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """The first `import tensorflow` (by embedjax, seqio, TFDS or the user) runs inside
    `captured_native_stderr`, followed by TensorFlow's device probe (where CUDA is looked for)."""

    _busy = False

    def find_spec(self, name, path=None, target=None):
        # also asked by availability checks (`importlib.util.find_spec("tensorflow")` in transformers) that
        # import nothing: the finder stays until the import itself runs (`_QuietLoader.exec_module`)
        if name != "tensorflow" or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._busy = False
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _QuietTensorFlowImport)]
        with captured_native_stderr():
            self.inner.exec_module(module)
            try:
                module.config.list_physical_devices("GPU")   # CUDA probing now, inside the capture
            except Exception:  # noqa: BLE001 - only the probe's noise is at stake
                pass

    def __getattr__(self, name):
        return getattr(self.inner, name)


def loud() -> None:
    """Undoes `quiet_startup` (the CLI's -v), as long as nothing it silences has started yet."""
    global _done
    for key in _set:
        os.environ.pop(key, None)
    _set.clear()
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _QuietTensorFlowImport)]
    logging.getLogger("absl").setLevel(logging.NOTSET)
    os.environ["EMBEDJAX_VERBOSE"] = "1"
    _done = True


def quiet_tfds() -> None:
    """TFDS's own progress bars and banners off (embedjax reports dataset preparation itself)."""
    if verbose_requested():
        return
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
