"""Prepared data: training examples tokenised once into indexed shards, read back without materialising them.

`prepare` (``embedjax prepare``, or the trainer on first use) reads the sources (`embedjax.data.records`:
sharded JSONL / Parquet / TFRecord / ArrayRecord, local or ``gs://``; seqio tasks; TFDS datasets), renders
each task's prompt with its instruction, tokenises with the model's tokenizer and writes::

    OUT/manifest.json                 format, fingerprint, tokenizer, lengths, prompt, tasks, shards
    OUT/shards/TASK/00003-000.ejs     one shard: the examples of input file 3 (part 0) of task TASK
    OUT/parts/00003.json              input file 3 is done (prepare resumes after a kill at file granularity)

A shard file holds a JSON header and flat little-endian arrays, the layout of `pipeline.TokenizedSet`
(token ids and offsets of queries, positives, negatives; 64-bit text keys; scores; the example's id), plus a
per-example index record of all its offsets. A reader (`PreadShard`) reads one example with a few positioned
reads (``gs://`` shards are first copied to a local cache), so opening costs a header read and memory does not
grow with the data.

At prepare time a negative equal to its example's query, positive or an earlier negative is dropped (and
counted); in-batch conflicts between examples (the same positive in two rows, a duplicate query, another
row's positive as a negative) are the loss's false-negative masks (``loss.mask_false_negatives``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import bisect
import logging
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np

from embedjax.data import records
from embedjax.data.pipeline import TokenizedSet, _offsets
from embedjax.data.prompts import Prompt, task_prompt
from embedjax.data.sources import DataError, doc_text

log = logging.getLogger(__name__)

FORMAT = "embedjax-prepared"
VERSION = 1
_MAGIC = b"EJXSHRD1"
ROW_FIELDS = 11   # int64 per example in the "rows" index (see `row_index`)
_REC = struct.Struct(f"<{ROW_FIELDS}q")
_CACHE = 512      # index records / keys kept per open shard (examples are looked at several times per batch)
_KEY_FORMATS: dict[int, struct.Struct] = {}   # struct of n little-endian int64 text keys, per n
_ALIGN = 64
ARRAYS = ("idx", "query_ids", "query_off", "pos_ids", "pos_off", "neg_ids", "neg_off", "neg_row_off", "keys",
          "key_off", "scores", "score_off")


def text_key(text: str) -> int:
    """64-bit key of a text (stripped): equal texts, equal keys (BLAKE2b, as a signed int64)."""
    h = hashlib.blake2b(text.strip().encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little", signed=True)


def tokenizer_fingerprint(tok: Any) -> str:
    """A hash of the tokenizer's full definition (vocabulary, normaliser, special tokens)."""
    return hashlib.sha256(tok.hf.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "_"


# --------------------------------------------------------------------------------------------- shard files
def row_index(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per example, every offset a reader needs in one record: int64 [n, 11] = query, positive, negative-row,
    key and score ranges (start, end) and the example id (`ROW_FIELDS`)."""
    cols = []
    for off in ("query_off", "pos_off", "neg_row_off", "key_off", "score_off"):
        o = np.asarray(arrays[off], np.int64)
        cols += [o[:-1], o[1:]]
    cols.append(np.asarray(arrays["idx"], np.int64))
    return np.stack(cols, axis=1)


def write_shard(path: Any, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> int:
    """Writes one shard file (local or gs://, via a local temporary file and a rename / copy); returns bytes."""
    entries, offset, blobs = {}, 0, []
    arrays = {**arrays, "rows": row_index(arrays).reshape(-1)}
    for name in ARRAYS + ("rows",):
        a = np.ascontiguousarray(arrays[name])
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        entries[name] = {"dtype": a.dtype.str, "offset": offset, "count": int(a.size)}
        blobs.append(a.tobytes())
        offset += len(blobs[-1])
        pad = -offset % _ALIGN
        blobs.append(b"\0" * pad)
        offset += pad
    header = json.dumps({"arrays": entries, **meta}).encode()
    head_len = len(_MAGIC) + 8 + len(header)
    head_pad = -head_len % _ALIGN
    data_start = head_len + head_pad
    with tempfile.NamedTemporaryFile(dir=_local_dir(path), delete=False, suffix=".tmp") as f:
        f.write(_MAGIC + data_start.to_bytes(8, "little") + header + b"\0" * head_pad)
        for b in blobs:
            f.write(b)
        tmp = f.name
    size = os.path.getsize(tmp)
    _publish(tmp, path)
    return size


def _local_dir(path: Any) -> str | None:
    s = str(path)
    if "://" in s:
        return None
    Path(s).parent.mkdir(parents=True, exist_ok=True)
    return str(Path(s).parent)


def _publish(tmp: str, path: Any) -> None:
    """Moves a finished local temporary file to `path` (atomic rename locally; a copy to gs://)."""
    if "://" in str(path):
        dst = records.as_path(path)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "rb") as src, dst.open("wb") as out:
            shutil.copyfileobj(src, out, 1 << 22)
        os.unlink(tmp)
    else:
        os.replace(tmp, str(path))


def _read_header(local_path: str) -> tuple[dict[str, Any], int]:
    with open(local_path, "rb") as f:
        magic = f.read(len(_MAGIC))
        if magic != _MAGIC:
            raise DataError(f"{local_path}: not an embedjax prepared shard (bad magic {magic!r})")
        data_start = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(data_start - len(_MAGIC) - 8).rstrip(b"\0"))
    size = os.path.getsize(local_path)
    for name, e in header["arrays"].items():
        if data_start + e["offset"] + e["count"] * np.dtype(e["dtype"]).itemsize > size:
            raise DataError(f"{local_path}: array {name!r} runs past the end of the file (truncated copy?)")
    return header, data_start


class PreadShard:
    """A shard read example by example with positioned reads (``os.pread``): one read of the example's index
    record, then one per token range. Nothing is mapped into the process, so its memory does not grow with
    the data (a memory map would add every page -- and the large page-cache folios around it -- that it ever
    touched to the resident set). Same interface as `pipeline.TokenizedSet` for the batch iterator."""

    def __init__(self, local_path: str):
        self.path = local_path
        header, base = _read_header(local_path)
        self.header = header
        self._arr = {n: (base + e["offset"], np.dtype(e["dtype"])) for n, e in header["arrays"].items()}
        if "rows" not in self._arr:
            raise DataError(f"{local_path}: no row index (written by an older embedjax; prepare again)")
        self.n = int(header["examples"])
        self._rows_base = self._arr["rows"][0]
        self._file = open(local_path, "rb", buffering=0)   # closed with the object
        self._fd = self._file.fileno()
        self._recs: dict[int, tuple[int, ...]] = {}
        self._keys: dict[int, tuple[int, ...]] = {}
        # (base, itemsize, dtype) of the token arrays read for every batch row (the hot path, inlined below)
        self._qa = (self._arr["query_ids"][0], self._arr["query_ids"][1].itemsize, self._arr["query_ids"][1])
        self._pa = (self._arr["pos_ids"][0], self._arr["pos_ids"][1].itemsize, self._arr["pos_ids"][1])
        if self._arr["keys"][1] != np.dtype("<i8"):
            raise DataError(f"{local_path}: text keys are {self._arr['keys'][1]}, expected little-endian int64")
        self._keys_base = self._arr["keys"][0]
        self._no_scores = int(header["arrays"]["scores"]["count"]) == 0
        self._empty_scores = np.zeros(0, self._arr["scores"][1])

    def __len__(self) -> int:
        return self.n

    def __reduce__(self) -> tuple:
        """Pickled as its path: a worker process (`ParallelBatches`) opens the file itself."""
        return PreadShard, (self.path,)

    def _read(self, name: str, start: int, end: int) -> np.ndarray:
        base, dt = self._arr[name]
        if end <= start:
            return np.zeros(0, dt)
        return np.frombuffer(os.pread(self._fd, (end - start) * dt.itemsize, base + start * dt.itemsize), dt)

    def _rec(self, i: int) -> tuple[int, ...]:
        r = self._recs.get(i)
        if r is None:   # a few examples are asked for several times per batch (dedup, then padding)
            if len(self._recs) >= _CACHE:
                self._recs.clear()
            r = self._recs[i] = _REC.unpack(os.pread(self._fd, _REC.size, self._rows_base + i * _REC.size))
        return r

    def query(self, i: int) -> np.ndarray:
        r = self._recs.get(i) or self._rec(i)
        base, size, dt = self._qa
        n = r[1] - r[0]
        return np.frombuffer(os.pread(self._fd, n * size, base + r[0] * size), dt) if n > 0 else np.zeros(0, dt)

    def positive(self, i: int) -> np.ndarray:
        r = self._recs.get(i) or self._rec(i)
        base, size, dt = self._pa
        n = r[3] - r[2]
        return np.frombuffer(os.pread(self._fd, n * size, base + r[2] * size), dt) if n > 0 else np.zeros(0, dt)

    def num_negatives(self, i: int) -> int:
        r = self._rec(i)
        return r[5] - r[4]

    def negative(self, i: int, j: int) -> np.ndarray:
        row = self._rec(i)[4] + j
        off = self._read("neg_off", row, row + 2)
        return self._read("neg_ids", int(off[0]), int(off[1]))

    def example_keys(self, i: int) -> tuple[int, ...]:
        """The example's text keys (query, positive, negatives...) as Python ints (compared in sets per row)."""
        k = self._keys.get(i)
        if k is None:
            if len(self._keys) >= _CACHE:
                self._keys.clear()
            r = self._recs.get(i) or self._rec(i)
            n = r[7] - r[6]
            fmt = _KEY_FORMATS.get(n) or _KEY_FORMATS.setdefault(n, struct.Struct(f"<{n}q"))
            k = self._keys[i] = fmt.unpack(os.pread(self._fd, 8 * n, self._keys_base + 8 * r[6]))
        return k

    def example_scores(self, i: int) -> np.ndarray:
        if self._no_scores:
            return self._empty_scores
        r = self._rec(i)
        return self._read("scores", r[8], r[9])

    def example_index(self, i: int) -> int:
        return self._rec(i)[10]


def read_shard(local_path: str) -> tuple[TokenizedSet, dict[str, Any]]:
    """A whole shard file (local) read into memory as a `TokenizedSet`, and its header: for inspection and
    tests. Training reads shards example by example (`PreadShard`)."""
    header, base = _read_header(local_path)
    arrays = {}
    with open(local_path, "rb") as f:
        for name in ARRAYS:
            e = header["arrays"][name]
            f.seek(base + e["offset"])
            arrays[name] = np.fromfile(f, np.dtype(e["dtype"]), e["count"])
    return TokenizedSet(*(arrays[n] for n in ARRAYS)), header


# ----------------------------------------------------------------------------------------------- writing
@dataclasses.dataclass
class _Buffer:
    """One output shard being filled: Python lists of token ids and keys (bounded by rows_per_shard)."""

    idx: list[int] = dataclasses.field(default_factory=list)
    q: list[list[int]] = dataclasses.field(default_factory=list)
    p: list[list[int]] = dataclasses.field(default_factory=list)
    negs: list[list[list[int]]] = dataclasses.field(default_factory=list)
    keys: list[list[int]] = dataclasses.field(default_factory=list)
    scores: list[list[float]] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.idx)

    def arrays(self) -> dict[str, np.ndarray]:
        flat_negs = [n for row in self.negs for n in row]

        def cat(rows: Sequence[Sequence[Any]], dt: Any) -> np.ndarray:
            return np.fromiter((x for r in rows for x in r), dt, sum(len(r) for r in rows))

        return {
            "idx": np.asarray(self.idx, np.int64),
            "query_ids": cat(self.q, np.int32), "query_off": _offsets([len(x) for x in self.q]),
            "pos_ids": cat(self.p, np.int32), "pos_off": _offsets([len(x) for x in self.p]),
            "neg_ids": cat(flat_negs, np.int32), "neg_off": _offsets([len(x) for x in flat_negs]),
            "neg_row_off": _offsets([len(r) for r in self.negs]),
            "keys": cat(self.keys, np.int64), "key_off": _offsets([len(k) for k in self.keys]),
            "scores": cat(self.scores, np.float32), "score_off": _offsets([len(s) for s in self.scores]),
        }


@dataclasses.dataclass
class PrepareStats:
    examples: int = 0
    dropped_negatives: int = 0
    truncated: int = 0


class _Tokenize:
    """Formats (prompt per task) and tokenises chunks of examples into a shard buffer."""

    def __init__(self, tokenizer: Any, max_query_length: int, max_doc_length: int, prompts: tuple[str, str],
                 instruction: str, document_instruction: str):
        self.tok, self.lq, self.ld = tokenizer, max_query_length, max_doc_length
        self.templates, self.instruction, self.document_instruction = prompts, instruction, document_instruction
        self._prompts: dict[tuple[str, str], Prompt] = {}
        self.stats = PrepareStats()

    def prompt_for(self, task: str, instruction: str, doc_instruction: str) -> Prompt:
        key = (instruction or self.instruction, doc_instruction or self.document_instruction)
        if key not in self._prompts:
            try:
                self._prompts[key] = task_prompt(*self.templates, *key) or Prompt()
            except ValueError as e:
                raise DataError(f"task {task!r}: {e} (give the task an 'instruction')") from None
        return self._prompts[key]

    def add(self, buf: _Buffer, chunk: Sequence[Mapping[str, Any]], ids: Sequence[int], doc_instruction: str) -> None:
        qs, docs, layout = [], [], []
        for ex in chunk:
            pr = self.prompt_for(ex["task"], ex["instruction"], doc_instruction)
            keys = [text_key(ex["query"]), text_key(doc_text(ex["positive_title"], ex["positive"]))]
            seen = set(keys)
            keep = []
            for j, (n, t) in enumerate(zip(ex["negatives"], ex["negative_titles"])):
                k = text_key(doc_text(t, n))
                if k in seen:
                    self.stats.dropped_negatives += 1
                    continue
                seen.add(k)
                keys.append(k)
                keep.append(j)
            qs.append(pr.format_query(ex["query"]))
            docs.append(pr.format_document(ex["positive"], ex["positive_title"]))
            docs.extend(pr.format_document(ex["negatives"][j], ex["negative_titles"][j]) for j in keep)
            scores = ex["scores"]
            layout.append((len(keep), keys, [scores[0]] + [scores[1 + j] for j in keep] if scores else []))
        tq = self.tok.tokenize(qs, self.lq)
        td = self.tok.tokenize(docs, self.ld)
        self.stats.truncated += tq.num_truncated + td.num_truncated
        d = 0
        for i, (k, keys, scores) in enumerate(layout):
            buf.idx.append(int(ids[i]))
            buf.q.append(tq.ids[i])
            buf.p.append(td.ids[d])
            buf.negs.append(td.ids[d + 1: d + 1 + k])
            buf.keys.append(keys)
            buf.scores.append(scores)
            d += 1 + k
        self.stats.examples += len(chunk)


def _chunks(it: Iterable[Any], n: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for x in it:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclasses.dataclass
class InputShard:
    """One unit of input prepare reads and writes shards for: a file of a source, or a shard of a seqio task /
    TFDS split. `examples()` yields `Example`s with ``task`` / ``instruction``."""

    key: str                     # stable id (the file path, "seqio:TASK:i/n", ...)
    source: dict[str, Any]       # the source dict (name, instruction, document_instruction, rate)
    examples: Any                # () -> Iterator[Example]


def file_inputs(sources: Sequence[Mapping[str, Any]]) -> list[InputShard]:
    """The input shards of file sources (`records.check_source` dicts): one per matched file."""
    out = []
    for src in sources:
        src = records.check_source(src)
        for path in records.expand_files(src):
            out.append(InputShard(path, src, (lambda s=src, p=path: records.source_examples(s, p))))
    return out


def spec_fingerprint(spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def prepare(inputs: Sequence[InputShard], tokenizer: Any, out_dir: str | os.PathLike, *, max_query_length: int,
            max_doc_length: int, prompts: tuple[str, str] = ("", ""), instruction: str = "",
            document_instruction: str = "", rows_per_shard: int = 200_000, show_progress: bool | None = None,
            extra_spec: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Tokenises `inputs` into shards under `out_dir` (local or gs://) and writes its manifest (last).

    Resumable: an input whose ``parts/NNNNN.json`` exists (written after its shards) is not read again, so a
    killed prepare re-run continues with the first unfinished input. Returns the manifest.

    `prompts`: the config's (query, document) templates (``data.query_prompt`` / ``data.document_prompt``),
    rendered per task with its instruction (`prompts.task_prompt`); `instruction` / `document_instruction`
    serve tasks without one."""
    from embedjax.progress import progress

    out = records.as_path(out_dir)
    spec = {"format": FORMAT, "version": VERSION, "tokenizer": tokenizer_fingerprint(tokenizer),
            "max_query_length": int(max_query_length), "max_document_length": int(max_doc_length),
            "prompts": list(prompts), "instruction": instruction, "document_instruction": document_instruction,
            "pad_id": int(tokenizer.pad_id), "inputs": [i.key for i in inputs],
            **dict(extra_spec or {})}
    fp = spec_fingerprint(spec)
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("fingerprint") == fp:
            log.info("%s: already prepared (fingerprint %s)", out, fp)
            return manifest
        raise DataError(f"{out}: holds data prepared differently (fingerprint {manifest.get('fingerprint')}, "
                        f"this request {fp}: other sources, tokenizer, lengths or prompt); use another folder")
    spec_path = out / "spec.json"
    if spec_path.exists() and json.loads(spec_path.read_text()).get("fingerprint") != fp:
        raise DataError(f"{out}: an unfinished prepare of other data is there; remove the folder or use another")
    out.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps({"fingerprint": fp, **spec}, indent=1))
    tok = _Tokenize(tokenizer, max_query_length, max_doc_length, tuple(prompts), instruction, document_instruction)
    parts = []
    with progress(total=len(inputs), desc=f"prepare {out}", unit="file", show=show_progress) as bar:
        for n, inp in enumerate(inputs):
            done = out / "parts" / f"{n:05d}.json"
            if done.exists():
                parts.append(json.loads(done.read_text()))
                bar.update(1)
                continue
            parts.append(_prepare_input(n, inp, tok, out, rows_per_shard))
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps(parts[-1]))
            bar.update(1)
    tasks: dict[str, dict[str, Any]] = {}
    shards = []
    for part in parts:
        for sh in part["shards"]:
            shards.append(sh)
            t = tasks.setdefault(sh["task"], {"examples": 0, "shards": 0, "rate": sh["rate"],
                                              "instruction": sh["instruction"]})
            t["examples"] += sh["examples"]
            t["shards"] += 1
    if not shards:
        raise DataError(f"prepare {out}: the sources hold no examples")
    manifest = {**spec, "fingerprint": fp, "tasks": tasks, "shards": shards,
                "stats": {"examples": sum(t["examples"] for t in tasks.values()),
                          "dropped_negatives": sum(p["dropped_negatives"] for p in parts),
                          "truncated": sum(p["truncated"] for p in parts)}}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    log.info("prepared %d examples of %d task(s) in %d shard(s) at %s", manifest["stats"]["examples"], len(tasks),
             len(shards), out)
    return manifest


def _prepare_input(n: int, inp: InputShard, tok: _Tokenize, out: Any, rows_per_shard: int) -> dict[str, Any]:
    """Reads one input and writes its shards (one task per shard; a new part every rows_per_shard rows)."""
    src = inp.source
    before = dataclasses.replace(tok.stats)
    buffers: dict[str, _Buffer] = {}
    part_no: dict[str, int] = {}
    written: list[dict[str, Any]] = []
    instruction_of: dict[str, str] = {}

    def flush(task: str) -> None:
        buf = buffers.pop(task)
        k = part_no.get(task, 0)
        part_no[task] = k + 1
        rel = f"shards/{_safe(task)}/{n:05d}-{k:03d}.ejs"
        meta = {"task": task, "input": inp.key, "examples": len(buf)}
        size = write_shard(out / rel, buf.arrays(), meta)
        written.append({"path": rel, "task": task, "examples": len(buf), "bytes": size, "input": inp.key,
                        "rate": src.get("rate"), "instruction": instruction_of[task]})

    row = 0
    for chunk in _chunks(inp.examples(), 512):
        by_task: dict[str, list[tuple[int, dict]]] = {}
        for ex in chunk:
            by_task.setdefault(ex["task"], []).append((row, ex))
            row += 1
        for task, items in by_task.items():
            instruction_of.setdefault(task, items[0][1]["instruction"])
            while items:
                buf = buffers.setdefault(task, _Buffer())
                take, items = items[: rows_per_shard - len(buf)], items[rows_per_shard - len(buf):]
                # the example id: input number and row, unique over the prepared data
                tok.add(buf, [ex for _, ex in take], [(n << 32) | r for r, _ in take],
                        src.get("document_instruction", ""))
                if len(buf) >= rows_per_shard:
                    flush(task)
    for task in list(buffers):
        flush(task)
    return {"input": inp.key, "shards": written, "examples": tok.stats.examples - before.examples,
            "dropped_negatives": tok.stats.dropped_negatives - before.dropped_negatives,
            "truncated": tok.stats.truncated - before.truncated}


# ----------------------------------------------------------------------------------------------- reading
class PreparedData:
    """A prepared folder (local or gs://): its manifest, and shards opened on request (counted in `opened`)."""

    def __init__(self, root: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None):
        self.root = records.as_path(root)
        mpath = self.root / "manifest.json"
        if not mpath.exists():
            raise DataError(f"{self.root}: no manifest.json (not prepared yet, or prepare did not finish: run "
                            "`embedjax prepare` again)")
        self.manifest = json.loads(mpath.read_text())
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise DataError(f"{mpath}: not an {FORMAT} v{VERSION} manifest")
        self.fingerprint = self.manifest["fingerprint"]
        self.remote = "://" in str(self.root)
        default_cache = Path(os.environ.get("EMBEDJAX_CACHE_DIR", Path.home() / ".cache" / "embedjax")) / "prepared"
        self.cache_dir = Path(cache_dir or default_cache) / self.fingerprint
        self.opened: list[str] = []

    @property
    def tasks(self) -> dict[str, dict[str, Any]]:
        return self.manifest["tasks"]

    def shards(self, task: str) -> list[dict[str, Any]]:
        return sorted((s for s in self.manifest["shards"] if s["task"] == task), key=lambda s: s["path"])

    def open(self, shard: Mapping[str, Any]) -> PreadShard:
        """A shard's examples, read on demand (`PreadShard`; a gs:// shard is copied to the local cache first)."""
        src = self.root / shard["path"]
        if self.remote:
            local = self.cache_dir / shard["path"]
            if not local.exists() or local.stat().st_size != shard["bytes"]:
                local.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=local.parent, delete=False, suffix=".tmp") as f, \
                        src.open("rb") as r:
                    shutil.copyfileobj(r, f, 1 << 22)
                os.replace(f.name, local)
            path = str(local)
        else:
            path = str(src)
        ts = PreadShard(path)
        if len(ts) != shard["examples"]:
            raise DataError(f"{src}: holds {len(ts)} examples, the manifest says {shard['examples']}")
        self.opened.append(shard["path"])
        return ts


class ShardedTask:
    """One task's examples over several shards, as one indexable set (the interface the batch iterator reads).

    Example ``i`` lives in shard ``searchsorted(starts, i)``; nothing is copied."""

    def __init__(self, name: str, parts: Sequence[TokenizedSet], fingerprint: str):
        self.name = name
        self.parts = list(parts)
        self.starts = [0] + np.cumsum([len(p) for p in self.parts]).tolist()
        self._fingerprint = fingerprint
        if len(self.parts) == 1:    # one shard (a host's share in per-host order, usually): its methods directly
            one = self.parts[0]
            for name in ("query", "positive", "num_negatives", "negative", "example_keys", "example_scores",
                         "example_index"):
                setattr(self, name, getattr(one, name))

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _at(self, i: int) -> tuple[TokenizedSet, int]:
        s = bisect.bisect_right(self.starts, i) - 1
        return self.parts[s], i - self.starts[s]


    def query(self, i: int) -> np.ndarray:
        p, j = self._at(i)
        return p.query(j)

    def positive(self, i: int) -> np.ndarray:
        p, j = self._at(i)
        return p.positive(j)

    def num_negatives(self, i: int) -> int:
        p, j = self._at(i)
        return p.num_negatives(j)

    def negative(self, i: int, j: int) -> np.ndarray:
        p, k = self._at(i)
        return p.negative(k, j)

    def example_keys(self, i: int) -> np.ndarray:
        p, j = self._at(i)
        return p.example_keys(j)

    def example_scores(self, i: int) -> np.ndarray:
        p, j = self._at(i)
        return p.example_scores(j)

    def example_index(self, i: int) -> int:
        p, j = self._at(i)
        return p.example_index(j)

    def fingerprint(self) -> str:
        return self._fingerprint


def task_rates(data: PreparedData, rates: Mapping[str, float] | None = None) -> dict[str, float]:
    """Mixing rates: `rates` (e.g. a seqio Mixture's), else each source's ``rate``, else the task's size."""
    out = {}
    given = [t for t, info in data.tasks.items() if info.get("rate") is not None]
    if rates is None and given and len(given) != len(data.tasks):
        raise DataError(f"{data.root}: tasks {given} have a rate and {sorted(set(data.tasks) - set(given))} do not; "
                        "give every source a rate (relative weights) or none (rates by example count)")
    for t, info in data.tasks.items():
        if rates is not None:
            out[t] = float(rates.get(t, 0.0))
        else:
            out[t] = float(info["rate"]) if info.get("rate") is not None else float(info["examples"])
    unknown = sorted(set(rates or {}) - set(data.tasks))
    if unknown:
        raise DataError(f"rates name task(s) the prepared data does not hold: {unknown} (it holds "
                        f"{sorted(data.tasks)})")
    return out


def host_shards(data: PreparedData, task: str, process_index: int, process_count: int) -> list[dict[str, Any]]:
    """This host's shards of a task in per-host order: shards ``process_index::process_count`` (disjoint
    over hosts, together all of them)."""
    shards = data.shards(task)
    if len(shards) < process_count:
        raise DataError(f"task {task!r} has {len(shards)} shard(s) for {process_count} processes: every host "
                        "needs one. Prepare with a smaller rows_per_shard (more shards), split the input files, "
                        "or use data.host_order='global'")
    return shards[process_index::process_count]


# ------------------------------------------------------------------------------------- batches from workers
_WORKER: dict[str, Any] = {}


def _worker_init(data: Mapping[str, Any], converter: Any) -> None:
    _WORKER["data"], _WORKER["converter"] = data, converter


def _assemble(chunk: list) -> list:
    """Runs in a worker: planned batches -> padded arrays."""
    return [_WORKER["converter"](picks, _WORKER["data"]) for picks in chunk]


class ParallelBatches:
    """A `ContrastiveBatchIterator` over prepared shards whose batches are read and padded by `workers`
    processes: this process plans each batch (which examples, the dedup, the negatives: the iterator's state)
    and sends the plans, `chunk` batches at a time, to a pool; batches come back in order. The batches are
    those of the iterator alone, bit for bit, and `get_state` is the state after the last batch returned (the
    plans made ahead are not in it), so a checkpoint resumes exactly with or without workers. Workers are
    spawned (not forked: the training process runs JAX's threads) and reopen the shards by path."""

    def __init__(self, it: Any, workers: int, *, chunk: int = 16, ahead: int | None = None):
        import collections
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.it, self.chunk = it, int(chunk)
        self.ahead = int(ahead or 2 * workers)
        self.task_names = getattr(it, "task_names", ())
        # a worker that dies (or fails to start) breaks the pool: the next batch raises, nothing hangs
        self._pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                         initargs=(it.data, it.converter))
        self._pending: Any = collections.deque()
        self._ready: Any = collections.deque()
        self._state = it.get_state()

    def __iter__(self) -> "ParallelBatches":
        return self

    def _submit(self) -> None:
        while len(self._pending) < self.ahead:
            plans, states = [], []
            for _ in range(self.chunk):
                plans.append(self.it.plan())
                states.append(self.it.get_state())
            self._pending.append((self._pool.submit(_assemble, plans), states))

    def __next__(self) -> dict[str, np.ndarray]:
        if not self._ready:
            self._submit()
            result, states = self._pending.popleft()
            try:
                batches = result.result()
            except BrokenProcessPool as e:
                raise DataError(f"data.workers: a batch worker process died ({e}); with the 'spawn' start "
                                "method the main script must guard its entry point with "
                                "`if __name__ == '__main__':`") from e
            self._ready.extend(zip(batches, states))
            self._submit()
        batch, self._state = self._ready.popleft()
        return batch

    def get_state(self) -> dict[str, Any]:
        return self._state

    def set_state(self, state: Mapping[str, Any]) -> None:
        for result, _ in self._pending:     # plans made from the old state: dropped
            result.cancel()
        self._pending.clear()
        self._ready.clear()
        self.it.set_state(state)
        self._state = self.it.get_state()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def build_iterator(data: PreparedData, *, global_batch_size: int, max_query_length: int, max_doc_length: int,
                   num_negatives: int = 0, group_by_task: bool = True, dedup: bool = True, seed: int = 0,
                   process_index: int = 0, process_count: int = 1, host_order: str = "per_host",
                   rates: Mapping[str, float] | None = None, with_keys: bool = False, workers: int = 0) -> Any:
    """The resumable batch iterator of this process over prepared data (see `pipeline.ContrastiveBatchIterator`).

    ``per_host``: this host opens only its shards (`host_shards`) and fills its rows of each global batch;
    the task of a batch is drawn from ``(seed, step)``, so all hosts agree with ``group_by_task``.
    ``global``: every host builds the same global batches over all shards and keeps its rows (the run does
    not depend on the number of processes, and can resume on another).

    ``workers`` > 0: batches read and padded by that many processes (`ParallelBatches`), same batches."""
    from embedjax.data.pipeline import (BucketFeatureConverter, ContrastiveBatchIterator, local_batch_size,
                                        validate_rates)
    from embedjax.tokenize import bucket_lengths

    m = data.manifest
    if (int(max_query_length), int(max_doc_length)) != (m["max_query_length"], m["max_document_length"]):
        raise DataError(f"{data.root}: prepared with max lengths ({m['max_query_length']}, "
                        f"{m['max_document_length']}), the config asks ({max_query_length}, {max_doc_length}); "
                        "prepare again with the config's lengths")
    if int(workers) < 0:
        raise DataError(f"data.workers must be >= 0, got {workers}")
    if host_order not in ("per_host", "global"):
        raise DataError(f"host_order must be 'per_host' or 'global', got {host_order!r}")
    live = validate_rates(task_rates(data, rates), f"prepared data {data.root}")
    if host_order == "global" and process_count > 1:
        from embedjax.data.pipeline import HostRows

        local_batch_size(global_batch_size, process_count)
        it = build_iterator(data, global_batch_size=global_batch_size, max_query_length=max_query_length,
                            max_doc_length=max_doc_length, num_negatives=num_negatives, group_by_task=group_by_task,
                            dedup=dedup, seed=seed, rates=rates, with_keys=with_keys, workers=workers)
        return HostRows(it, process_index, process_count)
    local = local_batch_size(global_batch_size, process_count)
    sets = {}
    for t in sorted(live):
        shards = (host_shards(data, t, process_index, process_count) if process_count > 1 else data.shards(t))
        fp = spec_fingerprint({"data": data.fingerprint, "shards": [s["path"] for s in shards]})
        sets[t] = ShardedTask(t, [data.open(s) for s in shards], fp)
    pad_id = int(m["pad_id"])
    conv = BucketFeatureConverter(bucket_lengths(max_query_length), bucket_lengths(max_doc_length),
                                  num_negatives=num_negatives, pad_id=pad_id, task_names=sorted(live),
                                  with_keys=with_keys)
    it = ContrastiveBatchIterator(sets, local, rates=live, converter=conv, num_negatives=num_negatives,
                                  group_by_task=group_by_task, dedup=dedup, seed=seed)
    return ParallelBatches(it, int(workers)) if int(workers) else it
