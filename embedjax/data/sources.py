"""Readers for local training / evaluation files (no TensorFlow, no network).

Every reader returns plain Python records in one schema, `Example` (a dict), whatever the file format:

    {"query": str, "positive": str, "positive_title": str,
     "negatives": [str, ...], "negative_titles": [str, ...],   # same length, may be empty
     "scores": [float, ...],          # empty, or 1 + len(negatives): teacher / gold scores (positive first)
     "query_id": str, "positive_id": str}                      # "" when the file has none

Formats:

* pairs / triplets, ``.jsonl``: one object per line, ``{"query": str, "positive": DOC, "negatives": [DOC,
  ...],
  "scores": [float, ...]}`` (``negatives`` and ``scores`` optional), where DOC is a string or
  ``{"title": str, "text": str}``; ``.tsv``: ``query <TAB> positive [<TAB> negative ...]``, no quoting, with
  an optional header line naming the columns (``query``, ``positive``, ``negative...``, ``score...``; scores
  need a header).
* scored pairs, STS-B format (``.tsv``/``.csv``): ``genre, file, year, id, score, sentence1, sentence2`` and
  two optional trailing source fields (7 or 9 tab-separated fields, no quoting); or ``.jsonl`` with
  ``sentence1``, ``sentence2``, ``score``. The gold score becomes ``scores[0]``.
* BEIR folders: ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``),
  ``qrels/{split}.tsv`` (``query-id corpus-id score``, header line). Training pairs join each relevant qrel to
  the query text and the document (title and text kept apart; ``doc_text(title, text)`` is BEIR's ``(title + "
  " + text).strip()``).

Bad input raises `DataError` naming file and line, or with ``on_error="skip"`` the line is skipped and counted
in `ReadStats` (and logged): nothing is dropped without a count.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from embedjax import errors

log = logging.getLogger(__name__)

Example = dict[str, Any]
OnError = Literal["raise", "skip"]
PairKind = Literal["pairs", "scored_pairs", "beir"]

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"


DataError = errors.DataError   # defined in embedjax/errors.py (one module of error types)


def shipped_path(*parts: str) -> Path:
    """Path of a file shipped with the project (see `embedjax/data/shipped/PROVENANCE.md`)."""
    p = SHIPPED_DIR.joinpath(*parts)
    if not p.exists():
        raise FileNotFoundError(f"{p}: shipped data file not found (is this a full source checkout?)")
    return p


def doc_text(title: str, text: str) -> str:
    """A document as one string, as BEIR builds it: ``(title + " " + text).strip()``."""
    return (title + " " + text).strip()


@dataclass
class ReadStats:
    """What a reader did with a file: lines seen, examples kept, lines skipped (by reason)."""

    path: str
    lines: int = 0
    examples: int = 0
    skipped: int = 0
    reasons: collections.Counter = field(default_factory=collections.Counter)
    first_skipped: str = ""

    def skip(self, where: str, reason: str) -> None:
        self.skipped += 1
        self.reasons[reason.split(" (")[0]] += 1
        if not self.first_skipped:
            self.first_skipped = f"{where}: {reason}"

    def log(self) -> None:
        if self.skipped:
            log.warning(
                "%s: skipped %d malformed line(s) of %d (%s); first: %s",
                self.path,
                self.skipped,
                self.lines,
                dict(self.reasons),
                self.first_skipped,
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "lines": self.lines,
            "examples": self.examples,
            "skipped": self.skipped,
            "reasons": dict(self.reasons),
            "first_skipped": self.first_skipped,
        }


class _LineError(Exception):
    """Internal: a malformed line (the reader adds file and line)."""


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def _lines(path: Path, stats: ReadStats) -> Iterator[tuple[int, str]]:
    """(line number, line without newline) per non-blank line; undecodable lines come as `_BadLine`."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            stats.lines += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, _BadLine(f"invalid UTF-8 ({e.reason} at byte {e.start})")
                continue
            line = line.rstrip("\n").rstrip("\r")
            if line.strip():
                yield n, line


class _BadLine(str):
    """A line that could not even be decoded; carries the reason."""


def _run_lines(path: Path, on_error: OnError, parse) -> tuple[list[Example], ReadStats]:
    """Applies `parse(n, line) -> Example | None` to each line with the shared error policy."""
    _check_on_error(on_error)
    stats = ReadStats(str(path))
    out: list[Example] = []
    for n, line in _lines(path, stats):
        try:
            if isinstance(line, _BadLine):
                raise _LineError(str(line))
            ex = parse(n, line)
        except _LineError as e:
            if on_error == "raise":
                raise DataError(f"{path}:{n}: {e}") from None
            stats.skip(f"{path}:{n}", str(e))
            continue
        if ex is not None:
            out.append(ex)
    stats.examples = len(out)
    stats.log()
    return out, stats


# --------------------------------------------------------------------------------------------- field checks
def _str_field(obj: dict, key: str, *, required: bool = True, allow_empty: bool = False) -> str:
    if key not in obj or obj[key] is None:
        if required:
            raise _LineError(f"missing field {key!r}")
        return ""
    v = obj[key]
    if isinstance(v, (int, float)) and not isinstance(v, bool) and key.endswith("id"):
        v = str(v)
    if not isinstance(v, str):
        raise _LineError(f"field {key!r} is {type(v).__name__}, expected a string")
    if not allow_empty and not v.strip():
        raise _LineError(f"field {key!r} is empty")
    return v


def _doc(v: Any, what: str) -> tuple[str, str]:
    """(title, text) of a document given as a string or a {"title", "text"} object."""
    if isinstance(v, str):
        if not v.strip():
            raise _LineError(f"{what} is empty")
        return "", v
    if isinstance(v, dict):
        text = v.get("text")
        title = v.get("title") or ""
        if not isinstance(text, str) or not isinstance(title, str):
            raise _LineError(f"{what} must have a string 'text' (and optional string 'title')")
        if not doc_text(title, text):
            raise _LineError(f"{what} is empty")
        return title, text
    raise _LineError(f"{what} is {type(v).__name__}, expected a string or {{'title', 'text'}}")


def _score(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise _LineError(f"{what} is {v!r}, expected a number") from None
    v = float(v)
    if not math.isfinite(v):
        raise _LineError(f"{what} is {v}, expected a finite number")
    return v


def make_example(
    query: str,
    positive: str,
    *,
    positive_title: str = "",
    negatives: list[str] | None = None,
    negative_titles: list[str] | None = None,
    scores: list[float] | None = None,
    query_id: str = "",
    positive_id: str = "",
) -> Example:
    """An `Example` record with defaults filled in (and its invariants checked)."""
    negatives = list(negatives or [])
    negative_titles = list(negative_titles) if negative_titles is not None else [""] * len(negatives)
    scores = [float(s) for s in (scores or [])]
    if len(negative_titles) != len(negatives):
        raise ValueError("negative_titles and negatives differ in length")
    if scores and len(scores) != 1 + len(negatives):
        raise ValueError(f"scores has {len(scores)} values, expected 1 + {len(negatives)} negatives")
    return {
        "query": query,
        "positive": positive,
        "positive_title": positive_title,
        "negatives": negatives,
        "negative_titles": negative_titles,
        "scores": scores,
        "query_id": query_id,
        "positive_id": positive_id,
    }


# ----------------------------------------------------------------------------------------- pairs / triplets
def read_pairs(path: str | os.PathLike, *, on_error: OnError = "raise") -> tuple[list[Example], ReadStats]:
    """Pairs / triplets with optional teacher scores from ``.jsonl`` or ``.tsv`` (see module docstring)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return _run_lines(path, on_error, _parse_pair_json)
    if path.suffix in (".tsv", ".txt"):
        header: list[str] | None = None
        first = True

        def parse(n: int, line: str) -> Example | None:
            nonlocal header, first
            f = line.split("\t")
            if first:  # the first non-blank line may be a header
                first = False
                if len(f) >= 2 and f[0].strip().lower() == "query" and f[1].strip().lower() == "positive":
                    header = [c.strip().lower() for c in f]
                    bad = [c for c in header[2:] if not (c.startswith("negative") or c.startswith("score"))]
                    if bad:
                        raise DataError(
                            f"{path}:{n}: unknown header column(s) {bad}; expected query, positive, "
                            "negative..., score..."
                        )
                    return None
            return _parse_pair_tsv(f, header)

        return _run_lines(path, on_error, parse)
    raise DataError(f"{path}: unknown pairs format {path.suffix!r} (expected .jsonl or .tsv)")


def _parse_pair_json(n: int, line: str) -> Example:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise _LineError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise _LineError(f"expected a JSON object, got {type(obj).__name__}")
    query = _str_field(obj, "query")
    if "positive" not in obj or obj["positive"] is None:
        raise _LineError("missing field 'positive'")
    p_title, positive = _doc(obj["positive"], "field 'positive'")
    negs = obj.get("negatives") or []
    if not isinstance(negs, list):
        raise _LineError(f"field 'negatives' is {type(negs).__name__}, expected a list")
    neg_docs = [_doc(v, f"negatives[{i}]") for i, v in enumerate(negs)]
    scores = obj.get("scores")
    if scores is None:
        scores = []
    if not isinstance(scores, list):
        raise _LineError(f"field 'scores' is {type(scores).__name__}, expected a list of numbers")
    scores = [_score(s, f"scores[{i}]") for i, s in enumerate(scores)]
    if scores and len(scores) != 1 + len(neg_docs):
        raise _LineError(
            f"field 'scores' has {len(scores)} values, expected {1 + len(neg_docs)} "
            "(the positive's, then one per negative)"
        )
    return make_example(
        query,
        positive,
        positive_title=p_title,
        negatives=[t for _, t in neg_docs],
        negative_titles=[h for h, _ in neg_docs],
        scores=scores,
        query_id=_str_field(obj, "query_id", required=False, allow_empty=True),
        positive_id=_str_field(obj, "positive_id", required=False, allow_empty=True),
    )


def _parse_pair_tsv(f: list[str], header: list[str] | None) -> Example:
    if len(f) < 2:
        raise _LineError(f"expected at least 2 tab-separated fields (query, positive), got {len(f)}")
    if header is not None and len(f) != len(header):
        raise _LineError(f"expected {len(header)} tab-separated fields (as the header), got {len(f)}")
    cols = header or (["query", "positive"] + ["negative"] * (len(f) - 2))
    negs, scores = [], []
    for c, v in zip(cols[2:], f[2:]):
        if c.startswith("negative"):
            if not v.strip():
                raise _LineError(f"column {c!r} is empty")
            negs.append(v)
        else:
            scores.append(_score(v.strip(), f"column {c!r}"))
    if not f[0].strip():
        raise _LineError("field 'query' is empty")
    if not f[1].strip():
        raise _LineError("field 'positive' is empty")
    if scores and len(scores) != 1 + len(negs):
        raise _LineError(
            f"{len(scores)} score columns, expected {1 + len(negs)} (positive, then each negative)"
        )
    return make_example(f[0], f[1], negatives=negs, scores=scores)


# --------------------------------------------------------------------------------------------- scored pairs
def read_scored_pairs(
    path: str | os.PathLike, *, on_error: OnError = "raise"
) -> tuple[list[Example], ReadStats]:
    """STS-B format (7 or 9 tab-separated fields, no quoting) or ``.jsonl`` (sentence1, sentence2, score)."""
    path = Path(path)
    if path.suffix == ".jsonl":

        def parse(n: int, line: str) -> Example:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise _LineError(f"not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise _LineError(f"expected a JSON object, got {type(obj).__name__}")
            if "score" not in obj:
                raise _LineError("missing field 'score'")
            return make_example(
                _str_field(obj, "sentence1"),
                _str_field(obj, "sentence2"),
                scores=[_score(obj["score"], "field 'score'")],
            )

        return _run_lines(path, on_error, parse)
    if path.suffix in (".tsv", ".csv"):

        def parse(n: int, line: str) -> Example:
            f = line.split("\t")
            if len(f) not in (7, 9):
                raise _LineError(
                    f"expected 7 or 9 tab-separated fields (STS-B format: genre, file, year, id, score, "
                    f"sentence1, sentence2[, source, source]), got {len(f)}"
                )
            score = _score(f[4], "score (field 5)")
            if not f[5].strip() or not f[6].strip():
                raise _LineError("sentence1 or sentence2 (fields 6-7) is empty")
            return make_example(f[5], f[6], scores=[score], query_id=f"{f[1]}:{f[2]}:{f[3]}")

        return _run_lines(path, on_error, parse)
    raise DataError(
        f"{path}: unknown scored-pairs format {path.suffix!r} (expected .tsv/.csv STS-B or .jsonl)"
    )


# ----------------------------------------------------------------------------------------------------- BEIR
@dataclass
class Beir:
    """A BEIR folder in memory: corpus id -> (title, text), query id -> text, split -> qid -> docid -> grade.
    """

    folder: Path
    corpus: dict[str, tuple[str, str]]
    queries: dict[str, str]
    qrels: dict[str, dict[str, dict[str, int]]]


def read_beir_corpus(path: str | os.PathLike, *, on_error: OnError = "raise") -> dict[str, tuple[str, str]]:
    """``corpus.jsonl`` -> {id: (title, text)} in file order; a repeated id is an error. Numeric ids are read as
    strings; ``title`` may be missing or null."""
    path = Path(path)
    out: dict[str, tuple[str, str]] = {}
    first_line: dict[str, int] = {}

    def parse(n: int, line: str) -> None:
        obj = _json_obj(line)
        did = _str_field(obj, "_id")
        if did in out:
            raise _LineError(f"duplicate document id {did!r} (first on line {first_line[did]})")
        first_line[did] = n
        out[did] = (
            _str_field(obj, "title", required=False, allow_empty=True),
            _str_field(obj, "text", allow_empty=True),
        )

    _run_lines(path, on_error, parse)
    if not out:
        raise DataError(f"{path}: corpus is empty (no documents)")
    return out


def read_beir_queries(path: str | os.PathLike, *, on_error: OnError = "raise") -> dict[str, str]:
    """``queries.jsonl`` -> {id: text}; a repeated id is an error."""
    path = Path(path)
    out: dict[str, str] = {}
    first_line: dict[str, int] = {}

    def parse(n: int, line: str) -> None:
        obj = _json_obj(line)
        qid = _str_field(obj, "_id")
        if qid in out:
            raise _LineError(f"duplicate query id {qid!r} (first on line {first_line[qid]})")
        first_line[qid] = n
        out[qid] = _str_field(obj, "text")

    _run_lines(path, on_error, parse)
    if not out:
        raise DataError(f"{path}: no queries")
    return out


def read_qrels(path: str | os.PathLike, *, on_error: OnError = "raise") -> dict[str, dict[str, int]]:
    """BEIR qrels (``query-id corpus-id score``, tab-separated, optional header line) or TREC qrels (``qid iter
    docid rel``, whitespace-separated) -> {qid: {docid: grade}}. Grades are integers ("1.0" is read as 1)."""
    path = Path(path)
    if not path.is_file():
        siblings = sorted(p.stem for p in path.parent.glob("*.tsv")) if path.parent.is_dir() else []
        hint = f" (available splits: {', '.join(siblings)})" if siblings else ""
        raise FileNotFoundError(f"qrels file not found: {path}{hint}")
    out: dict[str, dict[str, int]] = {}
    seen_data = []

    def parse(n: int, line: str) -> None:
        f = line.split("\t") if "\t" in line else line.split()
        if len(f) == 3:
            qid, did, grade_s = f
        elif len(f) == 4:
            qid, _, did, grade_s = f
        else:
            raise _LineError(f"expected 3 fields (query-id, corpus-id, score) or 4 (TREC), got {len(f)}")
        try:
            grade_f = float(grade_s)
        except ValueError:
            if not seen_data:   # the first line may be a header ("query-id corpus-id score")
                seen_data.append(n)
                return
            raise _LineError(f"score is not an integer: {grade_s!r}") from None
        seen_data.append(n)
        if not grade_f.is_integer():
            raise _LineError(f"score is not an integer: {grade_s!r}")
        out.setdefault(qid.strip(), {})[did.strip()] = int(grade_f)

    _run_lines(path, on_error, parse)
    if not out:
        raise DataError(f"{path}: no qrels")
    return out


def _json_obj(line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise _LineError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise _LineError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def read_beir(
    folder: str | os.PathLike, splits: tuple[str, ...] | None = None, *, on_error: OnError = "raise"
) -> Beir:
    """Reads a BEIR folder (all ``qrels/*.tsv`` splits unless `splits` is given)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such BEIR folder")
    if splits is None:
        splits = tuple(sorted(p.stem for p in (folder / "qrels").glob("*.tsv")))
        if not splits:
            raise DataError(f"{folder}: no qrels/*.tsv files")
    qrels = {s: read_qrels(folder / "qrels" / f"{s}.tsv", on_error=on_error) for s in splits}
    return Beir(
        folder,
        read_beir_corpus(folder / "corpus.jsonl", on_error=on_error),
        read_beir_queries(folder / "queries.jsonl", on_error=on_error),
        qrels,
    )


def beir_pairs(
    folder: str | os.PathLike | Beir, split: str = "train", *, min_grade: int = 1, on_error: OnError = "raise"
) -> tuple[list[Example], ReadStats]:
    """Training pairs from a BEIR split: one (query, relevant document) pair per qrel with grade >=
    `min_grade`, grouped by query in order of first appearance in the qrels file. A qrel naming an unknown
    query or document is an error (or skipped and counted)."""
    _check_on_error(on_error)
    beir = folder if isinstance(folder, Beir) else read_beir(folder, (split,), on_error=on_error)
    qpath = beir.folder / "qrels" / f"{split}.tsv"
    if split not in beir.qrels:
        raise DataError(f"{qpath}: split {split!r} not loaded")
    stats = ReadStats(str(qpath))
    out: list[Example] = []
    for qid, docs in beir.qrels[split].items():
        for did, grade in docs.items():
            stats.lines += 1
            if grade < min_grade:
                continue
            problem = (
                f"query {qid!r} not in queries.jsonl"
                if qid not in beir.queries
                else f"document {did!r} not in corpus.jsonl"
                if did not in beir.corpus
                else ""
            )
            if problem:
                if on_error == "raise":
                    raise DataError(f"{qpath}: {problem}")
                stats.skip(str(qpath), problem)
                continue
            title, text = beir.corpus[did]
            out.append(
                make_example(beir.queries[qid], text, positive_title=title, query_id=qid, positive_id=did)
            )
    stats.examples = len(out)
    stats.log()
    return out, stats


# ------------------------------------------------------------------------------------------------- dispatch
def read_examples(
    kind: PairKind, path: str | os.PathLike, split: str = "train", *, on_error: OnError = "raise"
) -> tuple[list[Example], ReadStats]:
    """Reads `path` as `kind` ("pairs", "scored_pairs" or "beir"); an empty result is a `DataError`."""
    if kind == "pairs":
        out, stats = read_pairs(path, on_error=on_error)
    elif kind == "scored_pairs":
        out, stats = read_scored_pairs(path, on_error=on_error)
    elif kind == "beir":
        out, stats = beir_pairs(path, split, on_error=on_error)
    else:
        raise ValueError(f"unknown data kind {kind!r}; expected 'pairs', 'scored_pairs' or 'beir'")
    if not out:
        extra = f" ({stats.skipped} malformed line(s) skipped)" if stats.skipped else ""
        raise DataError(f"{stats.path}: no examples{extra}")
    return out, stats
