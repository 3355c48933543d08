"""The recipes end to end at tiny size on 8 fake devices, each started from a tiny pretrained checkpoint the test
writes first: train (both stages where there are two), `embedjax eval` on the shipped STS-B test split,
`embedjax export`, the exports loaded by plain TensorFlow / sentence-transformers and compared with
`Encoder.encode` with the query prompt on 50 texts to 1e-5.

* Gecko-like (configs/gecko.py :smoke_pre then :smoke_ft): a tiny Gemma 3 switched to bidirectional attention,
  stage 1 on weak pairs, stage 2 started from stage 1's workdir on a mixture with per-task instructions (one
  FRet-style source whose rows carry their task description), one task per batch, hard and same-tower negatives,
  false-negative masks, Matryoshka; the checkpoint carries a SentencePiece tokenizer.model as Gemma ships, so
  the SavedModel tokenises in the graph (`<bos>` in front, as the Hugging Face tokenizer).
* E5-style (configs/e5.py :smoke_pre then :smoke_ft) from a tiny BERT.
* Sentence-T5 (configs/sentence_t5.py:smoke) from a tiny T5 v1.0 and GTR (configs/gtr.py:smoke) from a tiny T5
  v1.1, both written by transformers' PyTorch T5 with one SentencePiece tokenizer trained here (a module-scoped
  fixture)."""
import json

import numpy as np
import pytest

from _llm import write_checkpoint
from _mixture import INSTR, scifact_rows
from _processes import REPO

SHIPPED = REPO / "embedjax" / "data" / "shipped"


def _losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def _assert_loss_falls(workdir):
    losses = _losses(workdir)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), (str(workdir), losses)


def _eval_stsb(model_dir, out):
    from embedjax.cli import main

    assert main(["eval", "--model", str(model_dir), "--task", "stsb", "--data", str(SHIPPED / "stsb"), "--split",
                 "test", "--output", str(out)]) == 0
    assert "spearman" in json.loads(out.read_text())["metrics"]


def _check_exports(workdir, out, texts, ours, *, signature, st_prompt_name):
    """`embedjax export` of `workdir` to a SavedModel (loaded with plain TensorFlow: `signature` on `texts`) and
    to a sentence-transformers folder (loaded by sentence-transformers: `texts` with the prompt called
    `st_prompt_name`, or none): both equal `ours` to 1e-5. Returns the SentenceTransformer."""
    import tensorflow as tf
    from sentence_transformers import SentenceTransformer

    from embedjax.cli import main

    assert main(["export", "--workdir", str(workdir), "--output", str(out / "sm" / "1")]) == 0
    sm = tf.saved_model.load(str(out / "sm" / "1"))
    served = sm.signatures[signature](text=tf.constant(texts))["embedding"].numpy()
    np.testing.assert_allclose(served, ours, atol=1e-5)
    assert main(["export", "--workdir", str(workdir), "--format", "sentence-transformers",
                 "--output", str(out / "st")]) == 0
    st = SentenceTransformer(str(out / "st"), device="cpu")
    theirs = st.encode(texts, prompt_name=st_prompt_name, convert_to_numpy=True)
    np.testing.assert_allclose(theirs, ours, atol=1e-5)
    return sm, st


@pytest.mark.slow
def test_gecko_smoke_two_stages_eval_and_both_exports(tmp_path, caplog):
    from embedjax import Encoder
    from embedjax.config import load_config
    from embedjax.data import records
    from embedjax.trainer import train_and_evaluate

    ckpt = write_checkpoint("gemma3", tmp_path / "pretrained", sentencepiece=True)
    rows = scifact_rows(SHIPPED, 160)
    records.write_jsonl(tmp_path / "pre" / "part-0.jsonl",
                        [{"query": r["q"], "positive": r["doc"]} for r in rows["title"]])
    records.write_jsonl(tmp_path / "pre" / "part-1.jsonl",
                        [{"query": r["query"], "positive": r["positive"]["text"]} for r in rows["fact"][:80]])
    fret = [{"task": "Given a scientific claim, find the abstract that supports it", "query": r["query"],
             "positive": r["positive"], "negatives": r["negatives"][:1], "scores": r["scores"][:2]}
            for r in rows["fact"]]
    for k in range(2):
        records.write_jsonl(tmp_path / "fret" / f"part-{k}.jsonl", fret[k::2])
        records.write_jsonl(tmp_path / "titles" / f"part-{k}.jsonl",
                            [{"query": r["q"], "positive": r["doc"], "negatives": [rows["title"][-1 - i]["doc"]]}
                             for i, r in enumerate(rows["title"][k::2])])
    pre_sources = [{"name": "pre", "files": str(tmp_path / "pre" / "part-*.jsonl")}]
    ft_sources = [{"name": "fret", "files": str(tmp_path / "fret" / "part-*.jsonl"), "fields": {"instruction": "task"},
                   "rate": 1.0},
                  {"name": "titles", "files": str(tmp_path / "titles" / "part-*.jsonl"), "rate": 1.0,
                   "instruction": INSTR["title"]}]

    pre = load_config("configs/gecko.py:smoke_pre", [f"init_from='{ckpt}'", f"data.sources={pre_sources!r}"])
    res1 = train_and_evaluate(pre, tmp_path / "stage1")
    assert res1["final_step"] == pre.num_steps
    ft = load_config("configs/gecko.py:smoke_ft", [f"init_from='{tmp_path / 'stage1'}'",
                                                    f"data.sources={ft_sources!r}"])
    with caplog.at_level("INFO", logger="embedjax.trainer"):
        res2 = train_and_evaluate(ft, tmp_path / "stage2")
    assert res2["final_step"] == ft.num_steps
    for stage in ("stage1", "stage2"):
        _assert_loss_falls(tmp_path / stage)
    assert "task fret" in caplog.text and "task titles" in caplog.text and "masked false negatives" in caplog.text
    manifest = json.loads((tmp_path / "stage2" / "prepared" / "manifest.json").read_text())
    assert manifest["tasks"]["fret"]["instruction"] == fret[0]["task"]      # the rows' own task descriptions

    # stage 2 started from stage 1's weights (not from the pretrained checkpoint)
    s1, s2 = Encoder.load(tmp_path / "stage1" / "final"), Encoder.load(tmp_path / "stage2" / "final")
    assert s2.config.encoder.attention == "bidirectional" and s2.config.head.projection_dim == 64
    texts = [r["query"] for r in rows["fact"][:50]]
    e0 = Encoder.load(ckpt)
    assert not np.allclose(s1.encode(texts[:4]), s2.encode(texts[:4]), atol=1e-3)
    assert e0.config.head.projection_dim != 64

    _eval_stsb(tmp_path / "stage2" / "final", tmp_path / "eval.json")

    # both exports from the workdir, with the query prompt; the SavedModel's document signature too
    query_prompt = "task: search result | query: "
    ours = s2.encode(texts, prompt=query_prompt)
    np.testing.assert_allclose(s2.encode_queries(texts), ours, atol=1e-6)
    sm, st = _check_exports(tmp_path / "stage2", tmp_path, texts, ours, signature="query", st_prompt_name="query")
    assert st.prompts.get("query") == query_prompt
    import tensorflow as tf

    docs = [r["positive"]["text"] for r in rows["fact"][:20]]
    np.testing.assert_allclose(sm.signatures["document"](text=tf.constant(docs))["embedding"].numpy(),
                               s2.encode_documents(docs), atol=1e-5)
    # Matryoshka (64, 16) in training: 'embedding' is the 64, 'embedding_16' the other
    outputs = sm.signatures["query"](text=tf.constant(texts))
    assert sorted(outputs) == ["embedding", "embedding_16"]
    np.testing.assert_allclose(outputs["embedding_16"].numpy(), s2.encode(texts, prompt=query_prompt, dim=16),
                               atol=1e-5)


@pytest.mark.slow
def test_e5_smoke_two_stages_eval_and_both_exports(tmp_path, tiny_bert_dir):
    """configs/e5.py :smoke_pre -> :smoke_ft (from stage 1's workdir) on 8 fake devices, from a tiny pretrained
    BERT folder; `embedjax eval`; `embedjax export` to a SavedModel (loaded with plain TensorFlow) and to a
    sentence-transformers folder (loaded by sentence-transformers): both equal `Encoder.encode` with the query
    prompt on 50 texts to 1e-5."""
    from embedjax import Encoder
    from embedjax.config import load_config
    from embedjax.data import records
    from embedjax.trainer import train_and_evaluate

    rows = scifact_rows(SHIPPED, 160)
    for k in range(2):
        records.write_jsonl(tmp_path / "pairs" / f"part-{k}.jsonl",
                            [{"query": r["q"], "positive": r["doc"]} for r in rows["title"][k::2]])
        records.write_jsonl(tmp_path / "triplets" / f"part-{k}.jsonl",
                            [{"query": r["query"], "positive": r["positive"], "negatives": r["negatives"][:1]}
                             for r in rows["fact"][k::2]])
    pre = load_config("configs/e5.py:smoke_pre", [
        f"init_from='{tiny_bert_dir}'",
        f"data.sources={[{'name': 'pairs', 'files': str(tmp_path / 'pairs' / 'part-*.jsonl')}]!r}"])
    assert train_and_evaluate(pre, tmp_path / "stage1")["final_step"] == pre.num_steps
    ft = load_config("configs/e5.py:smoke_ft", [
        f"init_from='{tmp_path / 'stage1'}'",
        f"data.sources={[{'name': 'triplets', 'files': str(tmp_path / 'triplets' / 'part-*.jsonl')}]!r}"])
    assert train_and_evaluate(ft, tmp_path / "stage2")["final_step"] == ft.num_steps
    for stage in ("stage1", "stage2"):
        _assert_loss_falls(tmp_path / stage)

    final = Encoder.load(tmp_path / "stage2" / "final")
    _eval_stsb(tmp_path / "stage2" / "final", tmp_path / "eval.json")

    texts = [r["query"] for r in rows["fact"][:50]]
    ours = final.encode(texts, prompt="query: ")
    np.testing.assert_allclose(final.encode_queries(texts), ours, atol=1e-6)
    _, st = _check_exports(tmp_path / "stage2", tmp_path, texts, ours, signature="query", st_prompt_name="query")
    assert st.prompts.get("query") == "query: " and st.prompts.get("document") == "passage: "


@pytest.fixture(scope="module")
def t5_checkpoints(tmp_path_factory):
    """One SentencePiece tokenizer, two tiny pretrained T5 folders: v1.0 (Sentence-T5's start) and v1.1 (GTR's)."""
    from _spm import make_spm_tokenizer_dir, write_t5_checkpoint

    root = tmp_path_factory.mktemp("t5")
    tok = make_spm_tokenizer_dir(root)
    return {"v1_0": write_t5_checkpoint(root / "t5-v1_0", tok, v1_1=False),
            "v1_1": write_t5_checkpoint(root / "t5-v1_1", tok, v1_1=True)}


def _started_from(final, ckpt):
    """The trained encoder is the checkpoint's, moved by training: its token embeddings correlate with the
    pretrained ones (a random start would not) and differ from them."""
    from embedjax.models.convert import load_folder

    pre = np.asarray(load_folder(ckpt)[1]["tower"]["encoder"]["token_embedder"]["embedding"])
    got = np.asarray(final.params["tower"]["encoder"]["token_embedder"]["embedding"])
    assert got.shape == pre.shape and not np.allclose(got, pre)
    assert np.corrcoef(got.ravel(), pre.ravel())[0, 1] > 0.9


@pytest.mark.slow
def test_sentence_t5_smoke_eval_and_both_exports(tmp_path, t5_checkpoints):
    """configs/sentence_t5.py:smoke from a tiny pretrained T5 v1.0 (ReLU) on the shipped SciFact train pairs:
    a new bias-free projection, Adafactor, bidirectional in-batch softmax; `embedjax eval`; both exports.
    Sentence-T5 has no prompts, so the SavedModel's query encoding is its `serving_default` signature."""
    from embedjax import Encoder
    from embedjax.config import load_config
    from embedjax.trainer import train_and_evaluate

    cfg = load_config("configs/sentence_t5.py:smoke", [f"init_from='{t5_checkpoints['v1_0']}'"])
    assert cfg.optim.name == "adafactor" and cfg.loss.bidirectional and (cfg.mesh.data, cfg.mesh.fsdp) == (2, 4)
    assert train_and_evaluate(cfg, tmp_path / "run")["final_step"] == cfg.num_steps
    _assert_loss_falls(tmp_path / "run")
    final = Encoder.load(tmp_path / "run" / "final")
    assert final.config.architecture == "t5" and not final.config.encoder.is_gated
    head = final.config.head
    assert (head.pooling, head.projection_dim, head.projection_bias, head.normalize) == ("mean", 32, False, True)
    _started_from(final, t5_checkpoints["v1_0"])
    _eval_stsb(tmp_path / "run" / "final", tmp_path / "eval.json")

    texts = [json.loads(line)["text"] for line in (SHIPPED / "scifact" / "queries.jsonl").open()][:50]
    ours = final.encode(texts)
    sm, st = _check_exports(tmp_path / "run", tmp_path, texts, ours, signature="serving_default",
                            st_prompt_name=None)
    assert "query" not in sm.signatures and not st.prompts.get("query")


@pytest.mark.slow
def test_gtr_smoke_eval_and_both_exports(tmp_path, t5_checkpoints):
    """configs/gtr.py:smoke from a tiny pretrained T5 v1.1 (gated GELU) on triplets with one hard negative:
    a new bias-free projection, Adafactor, query->document in-batch softmax; `embedjax eval`; both exports (GTR
    has no prompts: `serving_default` is the query encoding)."""
    from embedjax import Encoder
    from embedjax.config import load_config
    from embedjax.data import records
    from embedjax.trainer import train_and_evaluate

    rows = scifact_rows(SHIPPED, 200)["fact"]
    records.write_jsonl(tmp_path / "triplets.jsonl", [{"query": r["query"], "positive": r["positive"],
                                                       "negatives": r["negatives"][:1]} for r in rows])
    cfg = load_config("configs/gtr.py:smoke", [f"init_from='{t5_checkpoints['v1_1']}'",
                                               f"data.path='{tmp_path / 'triplets.jsonl'}'"])
    assert cfg.optim.name == "adafactor" and not cfg.loss.bidirectional and cfg.data.num_negatives == 1
    assert train_and_evaluate(cfg, tmp_path / "run")["final_step"] == cfg.num_steps
    _assert_loss_falls(tmp_path / "run")
    final = Encoder.load(tmp_path / "run" / "final")
    assert final.config.architecture == "t5" and final.config.encoder.is_gated
    head = final.config.head
    assert (head.pooling, head.projection_dim, head.projection_bias, head.normalize) == ("mean", 32, False, True)
    _started_from(final, t5_checkpoints["v1_1"])
    _eval_stsb(tmp_path / "run" / "final", tmp_path / "eval.json")

    texts = [r["query"] for r in rows[:50]]
    ours = final.encode(texts)
    sm, st = _check_exports(tmp_path / "run", tmp_path, texts, ours, signature="serving_default",
                            st_prompt_name=None)
    assert "query" not in sm.signatures and not st.prompts.get("query")
