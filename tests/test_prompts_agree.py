"""One prompt language: for every config in configs/, a query and a document (with and without a title) render
to the same string in the training data (the seqio task's TF preprocessor, and `embedjax prepare`'s per-task
rendering for streamed data), the evaluators (`apply_prompt`),
`Encoder.encode_queries` / `encode_documents` (`Encoder.format_texts`), the exports' Python twin
(`format_text`, also the SavedModel's warmup texts) and the SavedModel's in-graph formatting (`_format_tf`, the
function its query / document signatures call); the sentence-transformers folder's prompts give the same token
ids."""
from pathlib import Path

import pytest

tf = pytest.importorskip("tensorflow")

from embedjax.config import load_config  # noqa: E402
from embedjax.data import tasks  # noqa: E402
from embedjax.data.prompts import config_prompt, config_prompt_strings, prompt_from_config, task_prompt  # noqa: E402
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


@pytest.fixture(scope="module")
def tiny(tiny_bert_dir):
    from embedjax import Encoder

    return Encoder.load(tiny_bert_dir)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_path_renders_the_same_strings(path, tiny, tmp_path):
    from embedjax import Encoder

    spec = f"{path}:{VARIANTS[path.name]}" if path.name in VARIANTS else str(path)
    cfg = load_config(spec)
    qp, dp = config_prompt_strings(cfg.data)         # templates with data.instruction filled in
    prompt = config_prompt(cfg.data)
    assert _training_prompt(cfg) == prompt
    if prompt is None:
        return
    # streamed data (embedjax prepare) renders a task without its own instruction with data.instruction
    streamed = task_prompt(cfg.data.query_prompt, cfg.data.document_prompt, cfg.data.instruction,
                           cfg.data.document_instruction)
    for title in (TITLE, ""):
        train_q, train_d = _training(prompt, title)
        assert apply_prompt(qp, QUERY) == train_q == streamed.format_query(QUERY)
        assert apply_prompt(dp, BODY, title) == train_d == streamed.format_document(BODY, title)
    # serving gets bare texts: a document without a title, rendered in the graph and by the Python twin
    serve_q = _format_tf(prompt, "query", tf.constant([QUERY])).numpy()[0].decode()
    serve_d = _format_tf(prompt, "document", tf.constant([BODY])).numpy()[0].decode()
    assert serve_q == format_text(prompt, "query", QUERY) == apply_prompt(qp, QUERY)
    assert serve_d == format_text(prompt, "document", BODY) == apply_prompt(dp, BODY, "") == _training(prompt, "")[1]
    # the Encoder a trained model comes back as (the trainer's, an export's) applies the same prompt
    enc = Encoder(tiny.config, tiny.params, tiny.tokenizer, prompt=prompt)
    assert enc.format_texts([QUERY], "query") == [_training(prompt, "")[0]]
    for title in (TITLE, ""):
        assert enc.format_texts([BODY], "document", [title]) == [_training(prompt, title)[1]]
    # the sentence-transformers folder it saves: prefix + text gives the training token ids (titles aside:
    # a sentence-transformers prompt never sees one), and loading it back gives the same prompt
    folder = enc.save(tmp_path / "st")
    back = Encoder.load(folder)
    ids = tiny.tokenizer
    for role, text, trained in (("query", QUERY, _training(prompt, "")[0]), ("document", BODY, serve_d)):
        prefix = prompt.prefix(role)
        if prefix is None:   # no prefix form: the folder leaves the role out, loudly (st_prompts warns)
            assert role not in back.prompts
            continue
        assert back.prompts.get(role, "") == prefix
        assert ids(prefix + text)["input_ids"] == ids(trained)["input_ids"], (role, prefix)
        assert back.format_texts([text], role) == [trained]


def test_encode_queries_embeds_the_prompted_text(tiny):
    """`encode_queries` / `encode_documents` embed exactly `format_texts`'s strings, with the right tower."""
    import numpy as np

    from embedjax import Encoder

    enc = Encoder(tiny.config, tiny.params, tiny.tokenizer,
                  prompt=prompt_from_config("task: search result | query: {text}", "title: {title} | text: {text}"))
    np.testing.assert_array_equal(enc.encode_queries([QUERY]),
                                  enc.encode(["task: search result | query: does {braces} survive?"]))
    np.testing.assert_array_equal(enc.encode_documents([BODY], titles=[TITLE]),
                                  enc.encode(["title: A Title | text: The body  text."], tower="document"))
    with pytest.raises(TypeError, match="applies the model's own prompt"):
        enc.encode_queries([QUERY], prompt="x")


def test_gecko_untitled_documents_read_title_none_everywhere():
    prompt = prompt_from_config("task: search result | query: {text}", "title: {title} | text: {text}")
    assert _training(prompt, "")[1] == "title: none | text: The body  text."
    assert apply_prompt("title: {title} | text: {text}", BODY, "") == "title: none | text: The body  text."
    assert _training(prompt, TITLE)[1] == "title: A Title | text: The body  text."
