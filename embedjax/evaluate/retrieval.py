"""Dense retrieval evaluation on BEIR-format folders: exact search, trec_eval metrics, a corpus-embedding cache.

A BEIR folder holds ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``) and
``qrels/{split}.tsv`` (``query-id <TAB> corpus-id <TAB> score`` with a header line). Documents are embedded as
``(title + " " + text).strip()``, as BEIR does.

Search is exact and streamed: the corpus is embedded (or read back from the cache) a chunk at a time, each
chunk is scored against the queries in ``[query_chunk, corpus_chunk]`` blocks, and a running top-k per query
is kept. Neither a ``queries x corpus`` score matrix nor the whole corpus embedding matrix is ever held, so
memory does not grow with the corpus beyond its ids and texts (``bench/retrieval_memory.py`` measures this).

Ranking and metrics follow trec_eval (which BEIR and MTEB call through pytrec_eval):

* documents are ordered by score descending, ties by document id descending (``strcmp``), exactly;
* ``ndcg@k`` is trec_eval ``ndcg_cut.k``: gain = relevance grade (negative grades count 0), discount
  ``log2(rank + 1)``, ideal DCG from all judged grades of the query;
* ``recall@k`` is trec_eval ``recall.k``: relevant (grade >= 1) retrieved in the top k / all relevant;
* ``mrr@k``: reciprocal rank of the first relevant document within the top k (0 if none), as BEIR / MTEB.

Queries whose qrels name no document with grade >= 1 are skipped and counted (BEIR / MTEB drop queries
without qrels; a query judged only non-relevant would score 0 everywhere and is dropped here too). A qrel
naming a document that is not in the corpus is counted and reported, and kept: it can never be retrieved,
so it lowers recall / nDCG exactly as it does in pytrec_eval. With ``ignore_identical_ids`` a retrieved
document whose id equals the query id is dropped before scoring (BEIR's option, for ArguAna / Quora style
corpora); one extra document is retrieved so that k remain.

Compact indexes (``precision``, ``rescore``, ``dim``; see :mod:`embedjax.quantize`): the corpus is kept as
int8 / uint8 codes or packed bits, quantised chunk by chunk as it streams in, and searched with the float
queries (int8: asymmetric dot product; binary: Hamming distance). ``rescore`` re-ranks the top
``rescore_multiplier x k`` binary candidates with the float query against int8 codes or float32 vectors kept
beside the bits. ``dim`` keeps the first ``dim`` components (Matryoshka), re-normalised for "cos". int8 ranges
are the model's calibration when given, else the minimum and maximum of a random sample of
``corpus_chunk_size`` documents, which are streamed first. ``last_info`` reports ``index_bytes_per_doc`` and
``rescore_bytes_per_doc``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedjax.data.sources import DataError, read_beir_corpus, read_beir_queries
from embedjax.data.sources import read_qrels as read_beir_qrels
from embedjax.evaluate.base import (
    EncodeFn,
    Evaluator,
    encode_in_pieces,
    get_cache_key,
    l2_normalize,
)
from embedjax.progress import progress
from embedjax import quantize as qz

logger = logging.getLogger(__name__)

DEFAULT_K_VALUES: tuple[int, ...] = (1, 10, 100)


# One reader for BEIR folders, shared with training (embedjax.data.sources): same formats, same errors.
BeirFormatError = DataError


def read_corpus(path: str | os.PathLike) -> tuple[list[str], list[str], list[str]]:
    """Reads ``corpus.jsonl`` into ``(ids, titles, texts)`` in file order. Duplicate ids are an error."""
    corpus = read_beir_corpus(path)
    return list(corpus), [t for t, _ in corpus.values()], [x for _, x in corpus.values()]


def read_queries(path: str | os.PathLike) -> dict[str, str]:
    """Reads ``queries.jsonl`` into ``{query_id: text}``. Duplicate ids are an error."""
    return read_beir_queries(path)


def read_qrels(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """Reads BEIR qrels (``query-id corpus-id score``, tab-separated, header line) or TREC qrels
    (``qid iter docid rel``, whitespace-separated) into ``{query_id: {doc_id: grade}}``."""
    return read_beir_qrels(path)


@dataclass
class BeirData:
    """A BEIR split held in memory: corpus (ids, titles, texts in file order), queries, qrels."""

    doc_ids: list[str]
    doc_titles: list[str]
    doc_texts: list[str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    source: str = "<memory>"

    @classmethod
    def load(cls, data_dir: str | os.PathLike, split: str = "test") -> BeirData:
        d = Path(data_dir)
        if not d.is_dir():
            raise FileNotFoundError(f"BEIR folder not found: {d}")
        qrels = read_qrels(d / "qrels" / f"{split}.tsv")  # first: a wrong split fails before the corpus is read
        ids, titles, texts = read_corpus(d / "corpus.jsonl")
        return cls(ids, titles, texts, read_queries(d / "queries.jsonl"), qrels, source=str(d))

    @classmethod
    def from_dicts(
        cls,
        corpus: Mapping[str, Mapping[str, str] | str],
        queries: Mapping[str, str],
        qrels: Mapping[str, Mapping[str, int]],
        source: str = "<memory>",
    ) -> BeirData:
        """From BEIR-style dicts: ``corpus = {id: {"title": ..., "text": ...} or text}``."""
        ids, titles, texts = [], [], []
        for doc_id, doc in corpus.items():
            ids.append(str(doc_id))
            if isinstance(doc, str):
                titles.append("")
                texts.append(doc)
            else:
                titles.append(doc.get("title") or "")
                texts.append(doc.get("text") or "")
        if not ids:
            raise BeirFormatError(f"{source}: corpus is empty (no documents)")
        return cls(
            ids, titles, texts, {str(k): v for k, v in queries.items()},
            {str(q): {str(d): int(g) for d, g in r.items()} for q, r in qrels.items()}, source=source,
        )


def apply_prompt(prompt: str | None, text: str, title: str | None = None) -> str:
    """Applies a query prompt (``title`` None) or a document prompt, as training and serving do
    (`embedjax.data.prompts.prompt_from_config`, the one prompt language): a plain prompt is prepended (to
    ``(title + " " + text).strip()`` for documents); a template is filled in (``{text}``; documents also
    ``{title}``, ``none`` when untitled, and ``{doc}``). Without a prompt a query is its text and a document
    ``(title + " " + text).strip()``."""
    from embedjax.data.prompts import prompt_from_config

    if not prompt:
        return text if title is None else (title + " " + text).strip()
    if title is None:
        return prompt_from_config(query_prompt=prompt).format_query(text)
    return prompt_from_config(document_prompt=prompt).format_document(text, title)


# ----------------------------------------------------------------------------------------------- search


def _ordered_bits(scores: np.ndarray) -> np.ndarray:
    """float32 -> uint32 whose unsigned order is the float order (IEEE-754 trick)."""
    bits = np.ascontiguousarray(scores, dtype=np.float32).view(np.uint32)
    neg = (bits >> np.uint32(31)).astype(bool)
    return np.where(neg, ~bits, bits | np.uint32(0x80000000))


def _unordered_bits(ordered: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_ordered_bits`."""
    ordered = ordered.astype(np.uint32)
    pos = (ordered >> np.uint32(31)).astype(bool)
    return np.where(pos, ordered & np.uint32(0x7FFFFFFF), ~ordered).view(np.float32)


def make_keys(scores_QxC: np.ndarray, doc_rank_C: np.ndarray) -> np.ndarray:
    """uint64 keys ``(ordered score bits << 32) | doc rank``: sorting keys descending sorts by score
    descending, then by doc rank descending. Ranks are unique, so there are no ties."""
    return (_ordered_bits(scores_QxC).astype(np.uint64) << np.uint64(32)) | doc_rank_C.astype(np.uint64)[None, :]


def keys_to_scores_ranks(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = _unordered_bits((keys >> np.uint64(32)).astype(np.uint32))
    ranks = (keys & np.uint64(0xFFFFFFFF)).astype(np.int64)
    return scores, ranks


def top_keys(keys_QxM: np.ndarray, k: int) -> np.ndarray:
    """The k largest keys of each row, sorted descending."""
    m = keys_QxM.shape[1]
    if k < m:
        keys_QxM = np.partition(keys_QxM, m - k, axis=1)[:, m - k :]
    return np.sort(keys_QxM, axis=1)[:, ::-1]


def doc_id_ranks(doc_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``rank_N[i]`` = position of ``doc_ids[i]`` in byte order (the tie order of trec_eval's strcmp), and its
    inverse ``doc_of_rank``."""
    if len(doc_ids) >= 2**32:
        raise ValueError("more than 2**32 documents")
    order = sorted(range(len(doc_ids)), key=lambda i: doc_ids[i].encode("utf-8"))
    doc_of_rank = np.asarray(order, dtype=np.int64)
    rank = np.empty(len(doc_ids), dtype=np.uint32)
    rank[doc_of_rank] = np.arange(len(doc_ids), dtype=np.uint32)
    return rank, doc_of_rank


def exact_search(
    q_QxD: np.ndarray,
    doc_chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    doc_rank_N: np.ndarray,
    doc_of_rank: np.ndarray,
    k: int,
    query_chunk_size: int = 1024,
    score_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by dot product (or ``score_fn(q_block, doc_chunk)``: quantised codes), streamed over
    ``doc_chunks`` of ``(doc_index_C, emb_CxD)``.

    Returns ``(scores_QxK float32, doc_index_QxK int64)``, each row in trec_eval order (score descending, ties
    by doc id descending); ``K = min(k, number of docs seen)``. Holds at most a ``[query_chunk, C + k]`` block
    of scores at a time.
    """
    n_q = q_QxD.shape[0]
    running: np.ndarray | None = None  # uint64 [Q, <=k]
    for doc_idx_C, d_CxD in doc_chunks:
        if score_fn is None and d_CxD.shape[1] != q_QxD.shape[1]:
            raise ValueError(f"document embeddings have dim {d_CxD.shape[1]}, query embeddings {q_QxD.shape[1]}")
        rank_C = doc_rank_N[doc_idx_C]
        blocks = []
        for qs in range(0, n_q, query_chunk_size):
            qe = min(qs + query_chunk_size, n_q)
            block = q_QxD[qs:qe] @ d_CxD.T if score_fn is None else score_fn(q_QxD[qs:qe], d_CxD)
            keys = make_keys(block, rank_C)
            if running is not None:
                keys = np.concatenate([running[qs:qe], keys], axis=1)
            blocks.append(top_keys(keys, k))
            del keys
        running = np.concatenate(blocks, axis=0)
    if running is None:
        raise ValueError("no documents to search")
    scores, ranks = keys_to_scores_ranks(running)
    return scores, doc_of_rank[ranks]


# ----------------------------------------------------------------------------------------------- metrics


def retrieval_metrics(
    ranked: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Mapping[str, int]],
    k_values: Sequence[int] = DEFAULT_K_VALUES,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """nDCG@k, Recall@k, MRR@k (see module docstring) of ranked doc-id lists (best first, already in
    trec_eval order), averaged over the queries of ``ranked``; every one must have a positive qrel.

    Returns ``(mean_metrics, per_query_metrics)``.
    """
    per_query: dict[str, dict[str, float]] = {}
    for qid, docs in ranked.items():
        rels = qrels.get(qid, {})
        n_rel = sum(1 for g in rels.values() if g >= 1)
        if n_rel == 0:
            raise ValueError(f"query {qid!r} has no relevant documents (grade >= 1) in the qrels")
        ideal_gains = sorted((g for g in rels.values() if g > 0), reverse=True)
        m: dict[str, float] = {}
        for k in k_values:
            top = docs[:k]
            dcg = sum(max(rels.get(d, 0), 0) / math.log2(i + 2) for i, d in enumerate(top))
            idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal_gains[:k]))
            m[f"ndcg@{k}"] = dcg / idcg
            m[f"recall@{k}"] = sum(1 for d in top if rels.get(d, 0) >= 1) / n_rel
            m[f"mrr@{k}"] = next((1.0 / (i + 1) for i, d in enumerate(top) if rels.get(d, 0) >= 1), 0.0)
        per_query[qid] = m
    if not per_query:
        raise ValueError("no queries to evaluate")
    names = [f"{m}@{k}" for m in ("ndcg", "recall", "mrr") for k in k_values]
    mean = {n: float(np.mean([pq[n] for pq in per_query.values()])) for n in names}
    return mean, per_query


# ----------------------------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$EMBEDJAX_CACHE_DIR`` or ``~/.cache/embedjax``, plus ``corpus_embeddings``."""
    root = os.environ.get("EMBEDJAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "embedjax")
    return Path(root) / "corpus_embeddings"


# Corpus embeddings shipped with embedjax, consulted after the cache folder and never written: those of the
# unchanged pretrained model in the README's main job (`python -m embedjax.evaluate.ship_cache` makes them).
# Found only under the same key as a cache entry (a hash of the weights, config, corpus and prompt), so a file
# here can only stand in for the very computation it came from.
SHIPPED_CACHE_DIR = Path(__file__).resolve().parents[1] / "data" / "shipped" / "corpus_embeddings"


class _CacheWriter:
    """Writes ``[N, D]`` float32 rows chunk by chunk into a ``.npy`` file, published atomically on close."""

    def __init__(self, path: Path, n_rows: int, meta: dict[str, Any]) -> None:
        self.path, self.n_rows, self.meta = path, n_rows, meta
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        self.tmp = Path(tmp)
        self.f = os.fdopen(fd, "wb")
        self.rows = 0
        self.dim: int | None = None

    def write(self, emb_CxD: np.ndarray) -> None:
        if self.dim is None:
            self.dim = int(emb_CxD.shape[1])
            header = {"descr": "<f4", "fortran_order": False, "shape": (self.n_rows, self.dim)}
            np.lib.format.write_array_header_2_0(self.f, header)
        self.f.write(np.ascontiguousarray(emb_CxD, dtype="<f4").data)  # a view, no copy
        self.rows += emb_CxD.shape[0]

    def commit(self) -> None:
        self.f.close()
        if self.rows != self.n_rows:
            raise RuntimeError(f"cache writer got {self.rows} rows, expected {self.n_rows}")
        os.replace(self.tmp, self.path)
        meta = dict(self.meta, n_docs=self.n_rows, dim=self.dim, created=time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.path.with_suffix(".json").write_text(json.dumps(meta, indent=1))

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def _find_cache(path: Path | None) -> Path | None:
    """The cache file for `path`'s key: the user's cache, else the shipped read-only one; None if neither."""
    if path is None:
        return None
    return next((p for p in (path, SHIPPED_CACHE_DIR / path.name) if p.is_file()), None)


def _open_cached(path: Path, n_rows: int) -> tuple[Any, int] | None:
    """Opens a cache file positioned at its data; None (with a warning) if it is unreadable or mismatched."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - handed to the caller, who closes it
    except OSError:
        return None
    try:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if fortran or dtype != np.dtype("<f4") or len(shape) != 2 or shape[0] != n_rows:
            raise ValueError(f"shape {shape}, dtype {dtype}, expected [{n_rows}, D] float32")
        if os.fstat(f.fileno()).st_size - f.tell() != shape[0] * shape[1] * 4:
            raise ValueError("truncated")
        return f, int(shape[1])
    except (OSError, ValueError) as e:  # a damaged cache entry is re-encoded, never fatal
        f.close()
        logger.warning("ignoring corpus cache %s: %s", path, e)
        return None


# ----------------------------------------------------------------------------------------------- evaluator


@dataclass
class SearchResult:
    """Top hits per evaluated query, in trec_eval order."""

    query_ids: list[str]
    doc_ids: list[list[str]]
    scores: list[list[float]]
    info: dict[str, Any] = field(default_factory=dict)


class RetrievalEvaluator(Evaluator):
    """Exact dense retrieval over a corpus, scored with trec_eval's nDCG@k / Recall@k and MRR@k.

    Args:
      data: the split (:meth:`from_beir` reads a BEIR folder).
      k_values: cut-offs; metrics ``ndcg@k``, ``recall@k``, ``mrr@k`` for each.
      query_prompt / document_prompt: applied as text before ``encode_fn`` (see :func:`apply_prompt`).
      score_function: ``"cos"`` (embeddings L2-normalised first) or ``"dot"``.
      ignore_identical_ids: drop a retrieved document whose id equals the query id (BEIR's option).
      cache_dir: where corpus embeddings are cached (default :func:`default_cache_dir`); ``use_cache=False``
        turns the cache off. Only encode_fns with a ``cache_key`` are cached.
      corpus_chunk_size / query_chunk_size: docs embedded and scored per step / queries per score block.
    """

    main_metric = "ndcg@10"

    def __init__(
        self,
        data: BeirData,
        name: str = "retrieval",
        k_values: Sequence[int] = DEFAULT_K_VALUES,
        query_prompt: str | None = None,
        document_prompt: str | None = None,
        score_function: str = "cos",
        ignore_identical_ids: bool = False,
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
        corpus_chunk_size: int = 4096,
        query_chunk_size: int = 1024,
        encode_piece_size: int = 512,
        show_progress: bool | None = None,
        precision: str = "float32",
        rescore: str | None = None,
        rescore_multiplier: int = 4,
        ranges: np.ndarray | None = None,
        dim: int | None = None,
        quantizer: Callable[[np.ndarray, str, np.ndarray | None], np.ndarray] | None = None,
        calibration_seed: int = 0,
    ) -> None:
        qz.check_precision(precision)
        if rescore is not None:
            if precision not in qz.BINARY:
                raise ValueError(f"rescore re-ranks a binary search's candidates; precision is {precision!r}")
            if rescore not in ("int8", "float32"):
                raise ValueError(f"rescore must be 'int8' or 'float32', got {rescore!r}")
        if rescore_multiplier < 1:
            raise ValueError(f"rescore_multiplier must be >= 1, got {rescore_multiplier}")
        if dim is not None and dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if score_function not in ("cos", "dot"):
            raise ValueError(f"score_function must be 'cos' or 'dot', got {score_function!r}")
        if not data.doc_ids:
            raise BeirFormatError(f"{data.source}: corpus is empty (no documents)")
        if not k_values or min(k_values) < 1:
            raise ValueError(f"k_values must be positive, got {k_values!r}")
        self.data = data
        self.name = name
        self.k_values = tuple(sorted({int(k) for k in k_values}))
        self.query_prompt = query_prompt
        self.document_prompt = document_prompt
        self.score_function = score_function
        self.ignore_identical_ids = ignore_identical_ids
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.use_cache = use_cache
        self.corpus_chunk_size = corpus_chunk_size
        self.query_chunk_size = query_chunk_size
        self.encode_piece_size = encode_piece_size
        self.show_progress = show_progress
        self.main_metric = "ndcg@10" if 10 in self.k_values else f"ndcg@{self.k_values[0]}"
        self.precision, self.rescore, self.rescore_multiplier = precision, rescore, int(rescore_multiplier)
        self.ranges = None if ranges is None else np.asarray(ranges, np.float32)
        self.dim = dim
        # how codes are made: embedjax.quantize.quantize, or a peer's function with the same signature
        self.quantizer = quantizer or qz.quantize
        self.calibration_seed = calibration_seed
        self.last_info: dict[str, Any] = {}
        self.last_per_query: dict[str, dict[str, float]] = {}
        self._check_qrels()

    @classmethod
    def from_beir(cls, data_dir: str | os.PathLike, split: str = "test", **kwargs: Any) -> RetrievalEvaluator:
        kwargs.setdefault("name", f"{Path(data_dir).name}-{split}")
        return cls(BeirData.load(data_dir, split), **kwargs)

    def _check_qrels(self) -> None:
        """Picks the queries to evaluate; counts and reports the qrels that cannot be used as they are."""
        doc_set = set(self.data.doc_ids)
        unknown_docs = [(q, d) for q, rels in self.data.qrels.items() for d in rels if d not in doc_set]
        missing_q = sorted(q for q in self.data.qrels if q not in self.data.queries)
        no_rel = sorted(
            q for q, rels in self.data.qrels.items() if q in self.data.queries and not any(g >= 1 for g in rels.values())
        )
        self.query_ids = [
            q for q, rels in self.data.qrels.items() if q in self.data.queries and any(g >= 1 for g in rels.values())
        ]
        self.counts = {
            "n_queries": len(self.query_ids),
            "n_docs": len(self.data.doc_ids),
            "n_qrels_unknown_docs": len(unknown_docs),
            "n_skipped_queries_no_relevant": len(no_rel),
            "n_skipped_queries_not_in_queries_file": len(missing_q),
        }
        src = self.data.source
        if unknown_docs:
            q, d = unknown_docs[0]
            logger.warning(
                "%s: %d qrels name documents not in the corpus (first: query %r -> doc %r); "
                "kept as relevant-but-unretrievable, as pytrec_eval does", src, len(unknown_docs), q, d,
            )
        if no_rel:
            logger.warning("%s: skipped %d queries with no relevant document in the qrels (first: %r)",
                           src, len(no_rel), no_rel[0])
        if missing_q:
            logger.warning("%s: skipped %d qrels queries missing from queries.jsonl (first: %r)",
                           src, len(missing_q), missing_q[0])
        if not self.query_ids:
            raise BeirFormatError(f"{src}: no query has both a text in queries.jsonl and a relevant document in the qrels")

    # -- corpus -------------------------------------------------------------------------------------

    def document_texts(self) -> list[str]:
        """The texts handed to encode_fn, prompt applied, in corpus order."""
        d = self.data
        return [apply_prompt(self.document_prompt, x, t) for t, x in zip(d.doc_titles, d.doc_texts)]

    def corpus_hash(self, texts: Sequence[str]) -> str:
        h = hashlib.sha256()
        for doc_id, text in zip(self.data.doc_ids, texts):
            h.update(doc_id.encode("utf-8"))
            h.update(b"\0")
            h.update(text.encode("utf-8"))
            h.update(b"\1")
        return h.hexdigest()

    def cache_path(self, encode_fn: EncodeFn, texts: Sequence[str] | None = None) -> Path | None:
        """The cache file for this corpus and encode_fn, or None if caching is off or encode_fn has no key."""
        key = get_cache_key(encode_fn)
        if not self.use_cache or key is None:
            return None
        texts = self.document_texts() if texts is None else texts
        digest = hashlib.sha256(
            "\0".join([key, self.corpus_hash(texts), repr(self.document_prompt)]).encode("utf-8")
        ).hexdigest()[:32]
        return self.cache_dir / f"{digest}.npy"

    def _view(self, emb: np.ndarray, normalize: bool) -> np.ndarray:
        """The evaluated part of embeddings: the first `dim` components (Matryoshka), normalised for "cos"."""
        if self.dim is not None:
            if self.dim > emb.shape[1]:
                raise ValueError(f"dim {self.dim} exceeds the embedding dimension {emb.shape[1]}")
            emb = emb[:, : self.dim]
        return l2_normalize(emb) if normalize else emb

    def _doc_chunks(
        self, encode_fn: EncodeFn, texts: list[str], order: np.ndarray, normalize: bool
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields ``(doc_index_C, emb_CxD)`` over the corpus in ``order``: read from the cache when there,
        otherwise embedded (and written to the cache)."""
        n = len(texts)
        path = self.cache_path(encode_fn, texts)
        found = _find_cache(path)
        opened = _open_cached(found, n) if found is not None else None
        self.last_info.update(cache_path=str(found or path) if path else None, cache_hit=opened is not None)
        if opened is not None:
            logger.info("%s: corpus embeddings read from %s", self.name, found)
        chunks = range(0, n, self.corpus_chunk_size)
        if opened is not None:
            f, dim = opened
            with f:
                for s in chunks:
                    idx = order[s : s + self.corpus_chunk_size]
                    emb = np.fromfile(f, dtype="<f4", count=len(idx) * dim).reshape(len(idx), dim)
                    yield idx, self._view(emb, normalize)
            return
        writer = None
        if path is not None:
            try:
                writer = _CacheWriter(path, n, {"cache_key": get_cache_key(encode_fn), "source": self.data.source,
                                                "document_prompt": self.document_prompt})
            except OSError as e:  # an unwritable cache folder costs the cache, not the evaluation
                logger.warning("not caching corpus embeddings: cannot write %s: %s", path.parent, e)
        try:
            with progress(n, f"encode corpus {self.name}", "doc", self.show_progress) as bar:
                for s in chunks:
                    idx = order[s : s + self.corpus_chunk_size]
                    emb = encode_in_pieces(encode_fn, [texts[i] for i in idx], "document", self.encode_piece_size, bar)
                    if writer is not None:
                        writer.write(emb)
                    yield idx, self._view(emb, normalize)
            if writer is not None:
                writer.commit()
                writer = None
        finally:
            if writer is not None:
                writer.abort()

    # -- search + metrics -----------------------------------------------------------------------------

    def search(self, encode_fn: EncodeFn, k: int | None = None) -> SearchResult:
        """Top-k documents for every evaluated query (k defaults to the largest cut-off)."""
        k = max(self.k_values) if k is None else k
        self.last_info = {}
        t0 = time.perf_counter()
        q_texts = [apply_prompt(self.query_prompt, self.data.queries[q]) for q in self.query_ids]
        with progress(len(q_texts), f"encode queries {self.name}", "query", self.show_progress) as bar:
            q_QxD = encode_in_pieces(encode_fn, q_texts, "query", self.encode_piece_size, bar)
        normalize = self.score_function == "cos"
        if normalize:
            q_QxD = l2_normalize(q_QxD)
        texts = self.document_texts()
        # Longest first: batches of similar length pad less (as BEIR does); ranking does not depend on order.
        lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
        order = np.argsort(-lengths, kind="stable")
        rank_N, doc_of_rank = doc_id_ranks(self.data.doc_ids)
        search_k = k + 1 if self.ignore_identical_ids else k
        q_QxD = self._view(q_QxD, normalize) if self.dim is not None else q_QxD
        if self.precision == "float32" and self.rescore is None:
            scores_QxK, idx_QxK = exact_search(
                q_QxD, self._doc_chunks(encode_fn, texts, order, normalize), rank_N, doc_of_rank,
                search_k, self.query_chunk_size,
            )
            self.last_info.update(index_bytes_per_doc=qz.bytes_per_vector(q_QxD.shape[1], "float32"))
        else:
            scores_QxK, idx_QxK = self._quantized_search(encode_fn, texts, order, normalize, q_QxD, rank_N,
                                                         doc_of_rank, search_k)
        doc_ids = self.data.doc_ids
        hits: list[list[str]] = []
        hit_scores: list[list[float]] = []
        for qi, qid in enumerate(self.query_ids):
            ids = [doc_ids[j] for j in idx_QxK[qi]]
            sc = scores_QxK[qi].tolist()
            if self.ignore_identical_ids:
                keep = [j for j, d in enumerate(ids) if d != qid]
                ids, sc = [ids[j] for j in keep], [sc[j] for j in keep]
            hits.append(ids[:k])
            hit_scores.append(sc[:k])
        self.last_info["search_seconds"] = time.perf_counter() - t0
        return SearchResult(list(self.query_ids), hits, hit_scores, dict(self.last_info))

    def _calibration(self, encode_fn: EncodeFn, texts: list[str], order: np.ndarray, normalize: bool
                     ) -> np.ndarray:
        """int8 ranges: the model's when given, else min / max over a random sample of documents (read from the
        corpus cache when it is there, else encoded)."""
        if self.ranges is not None:
            self.last_info["calibration"] = "given"
            return self.ranges
        n = len(texts)
        m = min(n, self.corpus_chunk_size)
        pos = np.sort(np.random.default_rng(self.calibration_seed).choice(n, size=m, replace=False))
        found = _find_cache(self.cache_path(encode_fn, texts))
        opened = _open_cached(found, n) if found is not None else None
        if opened is not None:   # rows of the cache are in `order`: row r is document order[r]
            f, d = opened
            with f:
                start = f.tell()
                sample = np.empty((m, d), np.float32)
                for i, r in enumerate(pos):
                    f.seek(start + int(r) * d * 4)
                    sample[i] = np.fromfile(f, dtype="<f4", count=d)
        else:
            sample = encode_in_pieces(encode_fn, [texts[i] for i in order[pos]], "document",
                                      self.encode_piece_size, None)
        self.last_info["calibration"] = f"sample of {m} documents"
        return qz.calibration_ranges(self._view(np.asarray(sample, np.float32), normalize))

    def _quantized_search(self, encode_fn: EncodeFn, texts: list[str], order: np.ndarray, normalize: bool,
                          q_QxD: np.ndarray, rank_N: np.ndarray, doc_of_rank: np.ndarray, k: int
                          ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over a quantised index built while the corpus streams in (see module docstring)."""
        dim = q_QxD.shape[1]
        needs_ranges = self.precision in qz.SCALAR or self.rescore == "int8"
        ranges = self._calibration(encode_fn, texts, order, normalize) if needs_ranges else None
        n = len(texts)
        codes = rescore_store = None
        for idx, emb in self._doc_chunks(encode_fn, texts, order, normalize):
            c = np.asarray(self.quantizer(emb, self.precision, ranges))
            if codes is None:
                codes = np.empty((n,) + c.shape[1:], c.dtype)
            codes[idx] = c
            if self.rescore is not None:
                r = np.asarray(self.quantizer(emb, self.rescore, ranges))
                if rescore_store is None:
                    rescore_store = np.empty((n,) + r.shape[1:], r.dtype)
                rescore_store[idx] = r
        self.last_info.update(index_bytes_per_doc=int(codes[0].nbytes), precision=self.precision,
                              rescore=self.rescore, dim=dim)
        if rescore_store is not None:
            self.last_info["rescore_bytes_per_doc"] = int(rescore_store[0].nbytes)

        def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for s in range(0, n, self.corpus_chunk_size):
                idx = np.arange(s, min(n, s + self.corpus_chunk_size))
                yield idx, codes[idx]

        first_k = min(n, k * self.rescore_multiplier) if self.rescore else k
        scores, idx = exact_search(q_QxD, chunks(), rank_N, doc_of_rank, first_k, self.query_chunk_size,
                                   score_fn=lambda q, c: qz.score(q, c, self.precision, ranges, dim))
        if self.rescore is None:
            return scores, idx
        # re-rank the candidates with the float query against int8 / float32 documents, in trec_eval order
        cand = rescore_store[idx]                                             # [Q, K', B]
        vals = qz.dequantize(cand, self.rescore, ranges)
        rescored = np.einsum("qd,qkd->qk", q_QxD.astype(np.float32), vals.astype(np.float32))
        keys = (_ordered_bits(rescored).astype(np.uint64) << np.uint64(32)) | rank_N[idx].astype(np.uint64)
        top = top_keys(keys, min(k, keys.shape[1]))
        s2, ranks = keys_to_scores_ranks(top)
        return s2, doc_of_rank[ranks]

    def run(self, encode_fn: EncodeFn) -> dict[str, float]:
        result = self.search(encode_fn)
        mean, per_query = retrieval_metrics(dict(zip(result.query_ids, result.doc_ids)), self.data.qrels, self.k_values)
        self.last_per_query = per_query
        return {**mean, **{k: float(v) for k, v in self.counts.items()}}


__all__ = [
    "BeirData",
    "BeirFormatError",
    "RetrievalEvaluator",
    "SearchResult",
    "apply_prompt",
    "SHIPPED_CACHE_DIR",
    "default_cache_dir",
    "doc_id_ranks",
    "exact_search",
    "read_corpus",
    "read_qrels",
    "read_queries",
    "retrieval_metrics",
]
