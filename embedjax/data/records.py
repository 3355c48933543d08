"""Reading training examples from sharded files, local or ``gs://``, one row at a time (nothing held whole).

A *source* is a dict (a config's ``data.sources`` entry)::

    {"name": "nq",                                # the task: mixing, one-task-per-batch, prompts
     "files": "gs://bucket/nq/train-*.jsonl",     # a glob (or a list of globs); local paths too
     "format": "jsonl",                           # jsonl | parquet | tfrecord | array_record (default: by suffix)
     "fields": {"query": "question"},             # our field -> the file's field (defaults: our names)
     "instruction": "Given a question, retrieve Wikipedia passages that answer it",
     "document_instruction": "",                  # INSTRUCTOR-style document instruction (optional)
     "rate": 1.0}                                 # mixing rate (default: the task's example count)

Fields of a row (after the mapping): ``query`` (str), ``positive`` (str, or ``{"title", "text"}``),
optional ``positive_title``, ``negatives`` (list of str / ``{"title", "text"}``), ``negative_titles``,
``scores`` (``1 + len(negatives)`` floats: teacher scores, positive first), ``task`` (a row's own task name,
overriding the source's, read only when ``fields`` maps it) and ``instruction`` (a row's own instruction; FRet
data as ``embedjax synth`` writes it: ``"fields": {"instruction": "task"}``). TFRecord and ArrayRecord records are
serialised ``tf.train.Example`` protos with those features (bytes lists for texts, a float list for scores).

Bad rows raise `DataError` naming the file and row. Files are read through etils.epath, so ``gs://`` works
wherever the Google Cloud Storage client does (``tests/_gcs.py`` runs it against a local emulator).
"""
from __future__ import annotations

import io
import json
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from embedjax.data.sources import DataError, make_example

FORMATS = ("jsonl", "parquet", "tfrecord", "array_record")
SOURCE_KEYS = ("name", "files", "format", "fields", "instruction", "document_instruction", "rate")
ROW_FIELDS = ("query", "positive", "positive_title", "negatives", "negative_titles", "scores", "task",
              "instruction")
_SUFFIX = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".tfrecord": "tfrecord",
           ".tfrecords": "tfrecord", ".array_record": "array_record", ".arrayrecord": "array_record"}


def as_path(p: str | os.PathLike) -> Any:
    """An etils.epath.Path (local or gs://)."""
    from etils import epath

    return epath.Path(str(p))


def check_source(src: Mapping[str, Any], where: str = "data.sources") -> dict[str, Any]:
    """A source dict with defaults filled in; unknown keys, fields or formats are errors."""
    src = dict(src)
    bad = sorted(set(src) - set(SOURCE_KEYS))
    if bad:
        raise DataError(f"{where}: unknown key(s) {bad}; a source has {list(SOURCE_KEYS)}")
    if not src.get("name") or not isinstance(src["name"], str):
        raise DataError(f"{where}: 'name' (the task name) is required")
    where = f"{where} {src['name']!r}"
    files = src.get("files")
    if not files:
        raise DataError(f"{where}: 'files' (a glob, local or gs://) is required")
    src["files"] = [files] if isinstance(files, str) else list(files)
    fmt = src.get("format") or ""
    if fmt and fmt not in FORMATS:
        raise DataError(f"{where}: format {fmt!r} is not one of {FORMATS}")
    src["format"] = fmt
    fields = dict(src.get("fields") or {})
    bad = sorted(set(fields) - set(ROW_FIELDS))
    if bad:
        raise DataError(f"{where}: fields maps unknown field(s) {bad}; our fields are {list(ROW_FIELDS)}")
    src["fields"] = fields
    src["instruction"] = str(src.get("instruction") or "")
    src["document_instruction"] = str(src.get("document_instruction") or "")
    rate = src.get("rate")
    if rate is not None and not (float(rate) >= 0):
        raise DataError(f"{where}: rate must be >= 0, got {rate}")
    src["rate"] = None if rate is None else float(rate)
    return src


def expand_files(src: Mapping[str, Any]) -> list[str]:
    """The source's files, sorted (a glob that matches nothing is an error naming it)."""
    out: list[str] = []
    for pattern in src["files"]:
        if any(ch in pattern for ch in "*?["):
            root, rest = _split_glob(pattern)
            hits = sorted(str(p) for p in as_path(root).glob(rest))
        else:
            hits = [pattern] if as_path(pattern).exists() else []
        if not hits:
            raise DataError(f"data.sources {src['name']!r}: {pattern!r} matches no file")
        out.extend(hits)
    return sorted(dict.fromkeys(out))


def _split_glob(pattern: str) -> tuple[str, str]:
    """'gs://b/dir/part-*.jsonl' -> ('gs://b/dir', 'part-*.jsonl'): the longest prefix without wildcards."""
    parts = pattern.split("/")
    for k, part in enumerate(parts):
        if any(ch in part for ch in "*?["):
            return "/".join(parts[:k]) or ".", "/".join(parts[k:])
    return "/".join(parts[:-1]) or ".", parts[-1]


def file_format(src: Mapping[str, Any], path: str) -> str:
    if src.get("format"):
        return src["format"]
    name = path.rsplit("/", 1)[-1]
    for suffix, fmt in _SUFFIX.items():
        if name.endswith(suffix) or f"{suffix}-" in name:
            return fmt
    raise DataError(f"{path}: cannot tell the format from the name; set 'format' in data.sources "
                    f"{src['name']!r} ({' | '.join(FORMATS)})")


# ------------------------------------------------------------------------------------------------ readers
def read_rows(path: str, fmt: str) -> Iterator[dict[str, Any]]:
    """Raw rows (dicts) of one file, streamed."""
    if fmt == "jsonl":
        with as_path(path).open("rb") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{path}:{n}: not JSON ({e})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
                yield obj
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        with as_path(path).open("rb") as f:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=4096):
                yield from batch.to_pylist()
    elif fmt == "tfrecord":
        with as_path(path).open("rb") as f:
            for rec in _tfrecords(f, path):
                yield _parse_example(rec, path)
    elif fmt == "array_record":
        yield from _array_records(path)
    else:
        raise DataError(f"{path}: unknown format {fmt!r}")


def _tfrecords(f: io.BufferedIOBase, path: str) -> Iterator[bytes]:
    """Records of a TFRecord file: uint64 length, uint32 CRC of it, data, uint32 CRC of the data."""
    n = 0
    while True:
        head = f.read(12)
        if not head:
            return
        n += 1
        if len(head) < 12:
            raise DataError(f"{path}: record {n}: truncated header (a partly written file?)")
        (length,) = struct.unpack("<Q", head[:8])
        data = f.read(length)
        if len(data) < length or len(f.read(4)) < 4:
            raise DataError(f"{path}: record {n}: truncated ({len(data)} of {length} bytes)")
        yield data


def _array_records(path: str) -> Iterator[dict[str, Any]]:
    from array_record.python.array_record_module import ArrayRecordReader

    local, tmp = path, None
    if "://" in path:   # the reader takes a local path: copy the file first (it is one shard)
        import tempfile

        tmp = tempfile.NamedTemporaryFile(suffix=".array_record", delete=False)
        tmp.write(as_path(path).read_bytes())
        tmp.close()
        local = tmp.name
    try:
        reader = ArrayRecordReader(local)
        try:
            for start in range(0, reader.num_records(), 1024):
                for rec in reader.read(list(range(start, min(start + 1024, reader.num_records())))):
                    yield _parse_example(rec, path)
        finally:
            reader.close()
    finally:
        if tmp is not None:
            os.unlink(tmp.name)


def _parse_example(rec: bytes, path: str) -> dict[str, Any]:
    from tensorflow.core.example import example_pb2

    ex = example_pb2.Example()
    try:
        ex.ParseFromString(rec)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError
        raise DataError(f"{path}: a record is not a serialised tf.train.Example ({e})") from None
    out: dict[str, Any] = {}
    for name, feat in ex.features.feature.items():
        kind = feat.WhichOneof("kind")
        if kind == "bytes_list":
            vals = [v.decode("utf-8") for v in feat.bytes_list.value]
        elif kind == "float_list":
            vals = list(feat.float_list.value)
        elif kind == "int64_list":
            vals = list(feat.int64_list.value)
        else:
            vals = []
        out[name] = vals
    # one-value features are scalars, except the list fields
    return {k: (v if k in ("negatives", "negative_titles", "scores") or len(v) != 1 else v[0])
            for k, v in out.items()}


# ------------------------------------------------------------------------------------------------ examples
def to_example(row: Mapping[str, Any], src: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A raw row -> an `Example` plus ``task`` and ``instruction`` (the row's own, else the source's)."""
    fields = src["fields"]

    def get(name: str, default: Any = None) -> Any:
        key = fields.get(name, name)
        if key in row:
            return row[key]
        if name in fields:   # a mapped field that the row lacks is an error, not a default
            if default is None:
                raise DataError(f"{where}: field {key!r} (mapped to {name!r}) is missing")
        return default

    q = get("query")
    if not isinstance(q, str) or not q.strip():
        raise DataError(f"{where}: 'query' must be a non-empty string, got {q!r}")
    pos, ptitle = _doc(get("positive"), "positive", where)
    ptitle = get("positive_title", "") or ptitle
    negs_raw = get("negatives", []) or []
    if not isinstance(negs_raw, (list, tuple)):
        raise DataError(f"{where}: 'negatives' must be a list, got {type(negs_raw).__name__}")
    negs, ntitles = [], []
    for k, n in enumerate(negs_raw):
        t, title = _doc(n, f"negatives[{k}]", where)
        negs.append(t)
        ntitles.append(title)
    given_titles = get("negative_titles", None)
    if given_titles:
        if len(given_titles) != len(negs):
            raise DataError(f"{where}: {len(given_titles)} negative_titles for {len(negs)} negatives")
        ntitles = [str(t) for t in given_titles]
    scores = get("scores", []) or []
    try:
        scores = [float(s) for s in scores]
    except (TypeError, ValueError):
        raise DataError(f"{where}: 'scores' must be numbers, got {scores!r}") from None
    try:
        ex = make_example(q, pos, positive_title=ptitle, negatives=negs, negative_titles=ntitles, scores=scores)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    # a row names its own task only when the mapping says where (FRet's "task" is a description: an instruction)
    ex["task"] = str(get("task", "") or src["name"]) if "task" in fields else src["name"]
    ex["instruction"] = str(get("instruction", "") or src["instruction"])
    return ex


def _doc(v: Any, what: str, where: str) -> tuple[str, str]:
    """A document field: a string, or {"title": str, "text": str}; -> (text, title)."""
    if isinstance(v, str) and v.strip():
        return v, ""
    if isinstance(v, Mapping) and isinstance(v.get("text"), str) and v["text"].strip():
        return v["text"], str(v.get("title") or "")
    raise DataError(f"{where}: {what!r} must be a non-empty string or {{'title', 'text'}}, got {v!r}")


def source_examples(src: Mapping[str, Any], path: str) -> Iterator[dict[str, Any]]:
    """The examples of one file of a source, each with ``task`` / ``instruction``."""
    fmt = file_format(src, path)
    for n, row in enumerate(read_rows(path, fmt), 1):
        yield to_example(row, src, f"{path}: row {n}")


def write_jsonl(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    """Rows as JSON lines (local or gs://): for tests and for `embedjax synth`-style outputs."""
    p = as_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
