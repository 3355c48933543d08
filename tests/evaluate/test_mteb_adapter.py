"""The mteb adapter, run by mteb itself on tasks built from local files, agrees with our evaluators."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

mteb = pytest.importorskip("mteb")
datasets = pytest.importorskip("datasets")

from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.types import PromptType

from embedjax.evaluate.base import encode_fn_from_encoder
from embedjax.evaluate.mteb_adapter import MTEBEncoder
from embedjax.evaluate.retrieval import BeirData, RetrievalEvaluator
from embedjax.evaluate.sts import STSEvaluator, read_stsb

DATA = Path(__file__).parent / "data"

COMMON = {
    "description": "Local test task built from tests/evaluate/data.",
    "reference": "https://example.org/embedjax-tests",
    "dataset": {"path": "local/embedjax-tests", "revision": "local"},
    "category": "t2t",
    "eval_splits": ["test"],
    "eval_langs": ["eng-Latn"],
    "date": ("2026-01-01", "2026-01-01"),
    "dialect": [],
    "domains": [],
    "task_subtypes": [],
    "license": "apache-2.0",
    "annotations_creators": "human-annotated",
    "modalities": ["text"],
    "sample_creation": "created",
    "bibtex_citation": "",
}


class LocalSTS(AbsTaskSTS):
    metadata = TaskMetadata(type="STS", name="EmbedjaxLocalSTS", main_score="cosine_spearman", **COMMON)
    min_score = 0
    max_score = 5

    def load_data(self, num_proc=None, **kwargs):
        d = read_stsb(DATA / "sts_toy.tsv")
        ds = datasets.Dataset.from_dict(
            {"sentence1": d.sentences1, "sentence2": d.sentences2, "score": d.scores.tolist()})
        self.dataset = {"default": {"test": ds}}
        self.data_loaded = True


class LocalRetrieval(AbsTaskRetrieval):
    metadata = TaskMetadata(type="Retrieval", name="EmbedjaxLocalRetrieval", main_score="ndcg_at_10", **COMMON)

    def load_data(self, num_proc=None, **kwargs):
        d = BeirData.load(DATA / "toy_beir", "test")
        corpus = datasets.Dataset.from_dict({"id": d.doc_ids, "title": d.doc_titles, "text": d.doc_texts})
        queries = datasets.Dataset.from_dict({"id": list(d.queries), "text": list(d.queries.values())})
        self.dataset = {"default": {"test": {"corpus": corpus, "queries": queries, "relevant_docs": d.qrels,
                                             "top_ranked": None}}}
        self.data_loaded = True


def _scores(result, task_name):
    for task_result in result.task_results:
        if task_result.task_name == task_name:
            return task_result.scores["test"][0]
    raise AssertionError(f"no result for {task_name}")


def test_implements_encoder_protocol(hash_encoder):
    from mteb.models.models_protocols import EncoderProtocol

    model = MTEBEncoder(hash_encoder)
    assert isinstance(model, EncoderProtocol)
    assert model.mteb_model_meta.name == "embedjax/hash-encoder"
    assert model.mteb_model_meta.revision == "hash-encoder-v1"


def test_mteb_runs_local_tasks_and_agrees(hash_encoder, tmp_path):
    model = MTEBEncoder(hash_encoder, query_prompt="query: ", document_prompt="passage: ")
    result = mteb.evaluate(model, [LocalSTS(), LocalRetrieval()], cache=None, show_progress_bar=False)
    sts = _scores(result, "EmbedjaxLocalSTS")
    ours_sts = STSEvaluator.from_file(DATA / "sts_toy.tsv", show_progress=False).run(
        encode_fn_from_encoder(hash_encoder))
    assert sts["cosine_spearman"] == pytest.approx(ours_sts["spearman"], abs=1e-6)
    assert sts["cosine_pearson"] == pytest.approx(ours_sts["pearson"], abs=1e-5)

    ret = _scores(result, "EmbedjaxLocalRetrieval")
    ours = RetrievalEvaluator.from_beir(DATA / "toy_beir", "test", k_values=(1, 10), use_cache=False,
                                        show_progress=False).run(
        encode_fn_from_encoder(hash_encoder, query_prompt="query: ", document_prompt="passage: "))
    assert ret["ndcg_at_10"] == pytest.approx(ours["ndcg@10"], abs=1e-6)
    assert ret["recall_at_10"] == pytest.approx(ours["recall@10"], abs=1e-6)
    assert ret["mrr_at_10"] == pytest.approx(ours["mrr@10"], abs=1e-6)
    assert ret["ndcg_at_1"] == pytest.approx(ours["ndcg@1"], abs=1e-6)
    # mteb asked for both towers, with our prompts.
    assert {t for t, _ in hash_encoder.calls} == {"query", "document"}


def test_prompt_selection(hash_encoder):
    meta = LocalRetrieval.metadata
    model = MTEBEncoder(hash_encoder, query_prompt="q: ", document_prompt="d: ")
    assert model._prompt(meta, PromptType.query) == "q: "
    assert model._prompt(meta, PromptType.document) == "d: "
    assert model._prompt(LocalSTS.metadata, None) is None
    per_task = MTEBEncoder(hash_encoder, model_prompts={"Retrieval-query": "task: search | query: "})
    assert per_task._prompt(meta, PromptType.query) == "task: search | query: "
    emb = per_task.encode([{"text": ["a b", "c"]}, {"text": ["d"]}], task_metadata=meta, hf_split="test",
                          hf_subset="default", prompt_type=PromptType.document)
    assert emb.shape == (3, 64) and emb.dtype == np.float32
    assert hash_encoder.calls[-2:] == [("document", 2), ("document", 1)]
