"""One prompt language: for every config in configs/, a query and a document (with and without a title) render
to the same string in the training data (the seqio task's TF preprocessor), the evaluators (`apply_prompt`),
the exports' Python twin (`format_text`, also the SavedModel's warmup texts) and the SavedModel's in-graph
formatting (`_format_tf`, the function its query / document signatures call)."""
from pathlib import Path

import pytest

tf = pytest.importorskip("tensorflow")

from embedjax.config import load_config  # noqa: E402
from embedjax.data import tasks  # noqa: E402
from embedjax.data.prompts import prompt_from_config  # noqa: E402
from embedjax.evaluate.retrieval import apply_prompt  # noqa: E402
from embedjax.export.saved_model import _format_tf  # noqa: E402
from embedjax.export.source import _training_prompt, format_text  # noqa: E402

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.py"))
VARIANTS = {"sentence_t5.py": "base"}
QUERY, BODY, TITLE = "does {braces} survive? ", "The body  text.", "A Title"


def _training(prompt, title: str) -> tuple[str, str]:
    """(query, positive) as the training data's preprocessor renders them."""
    ex = {"query": tf.constant([QUERY]), "positive": tf.constant([BODY]), "positive_title": tf.constant([title]),
          "negatives": tf.zeros([1, 0], tf.string), "negative_titles": tf.zeros([1, 0], tf.string)}
    out = next(iter(tasks.apply_prompt(tf.data.Dataset.from_tensors(ex), prompt)))
    return out["query"].numpy()[0].decode(), out["positive"].numpy()[0].decode()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_path_renders_the_same_strings(path):
    spec = f"{path}:{VARIANTS[path.name]}" if path.name in VARIANTS else str(path)
    cfg = load_config(spec)
    qp, dp = cfg.data.query_prompt, cfg.data.document_prompt
    prompt = prompt_from_config(qp, dp)
    assert _training_prompt(cfg) == prompt
    if prompt is None:
        return
    for title in (TITLE, ""):
        train_q, train_d = _training(prompt, title)
        assert apply_prompt(qp, QUERY) == train_q
        assert apply_prompt(dp, BODY, title) == train_d
    # serving gets bare texts: a document without a title, rendered in the graph and by the Python twin
    serve_q = _format_tf(prompt, "query", tf.constant([QUERY])).numpy()[0].decode()
    serve_d = _format_tf(prompt, "document", tf.constant([BODY])).numpy()[0].decode()
    assert serve_q == format_text(prompt, "query", QUERY) == apply_prompt(qp, QUERY)
    assert serve_d == format_text(prompt, "document", BODY) == apply_prompt(dp, BODY, "") == _training(prompt, "")[1]


def test_gecko_untitled_documents_read_title_none_everywhere():
    prompt = prompt_from_config("task: search result | query: {text}", "title: {title} | text: {text}")
    assert _training(prompt, "")[1] == "title: none | text: The body  text."
    assert apply_prompt("title: {title} | text: {text}", BODY, "") == "title: none | text: The body  text."
    assert _training(prompt, TITLE)[1] == "title: A Title | text: The body  text."
