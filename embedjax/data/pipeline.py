"""Training batches from tokenized examples: bucketed fixed shapes, no repeated text, per host, resumable.

The seqio tasks (`embedjax.data.tasks`) turn files into tokenized examples; this module (numpy only, no TF)
turns those into batches:

* `TokenizedSet`: one task's tokenized examples on this host, as flat numpy arrays.
* `BucketFeatureConverter`: picks of examples -> a dict of fixed-shape padded arrays. The sequence length of a
  batch is the smallest bucket (``embedjax.tokenize.bucket_lengths``, shared with `Encoder`) that holds its
  longest row, so a training run compiles one step per (query bucket, document bucket) pair at most.
* `ContrastiveBatchIterator`: an endless iterator over one host's share. Each task is read in a fresh
  permutation per epoch; tasks are mixed by rate (one task per batch, or per example); and with ``dedup`` no
  text (query, positive or chosen negative) appears twice in a batch: an example whose query or positive
  repeats a text already in the batch is deferred to a later batch, never dropped; a negative that would
  repeat one is passed over for another of the example's negatives (or masked). Its whole position is
  `get_state()` (a small JSON-able dict); `set_state()` on a fresh iterator over the same data continues with
  exactly the batch an uninterrupted run would have produced.
* `make_global_batch`: local batches of all processes -> global ``jax.Array``s on the training mesh.

Random choices (task of a batch, per-epoch order, negatives) come from counter-based generators seeded with
``(seed, step)`` or ``(seed, task, epoch, ...)``, so the state needs no RNG blob and all hosts agree on the
task of each step. Across hosts, `tasks.LocalTfdsSource` keeps examples that share a query / positive text on
one host and `tasks.build_iterator` passes each host the texts it must not use as negatives
(``exclude_negative_keys``), so a global batch repeats no query / positive and holds no false negative.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import logging
import zlib
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from embedjax.data.sources import DataError
from embedjax.tokenize import bucket_for, bucket_lengths

log = logging.getLogger(__name__)

STATE_VERSION = 1
Batch = dict[str, np.ndarray]


# ------------------------------------------------------------------------------------------- tokenized data
def _offsets(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(np.asarray(lengths, np.int64), out=out[1:])
    return out


@dataclasses.dataclass
class TokenizedSet:
    """One task's tokenized examples (this host's share), stored flat.

    Row ``i``: query ids ``query_ids[query_off[i]:query_off[i+1]]``; positive likewise; its negatives are rows
    ``neg_row_off[i]:neg_row_off[i+1]`` of the negatives table, whose ids are
    ``neg_ids[neg_off[r]:neg_off[r+1]]``; its text keys (hashes: query, positive, negatives...)
    ``keys[key_off[i]:key_off[i+1]]``; its scores (empty or 1 + #negatives)
    ``scores[score_off[i]:score_off[i+1]]``. ``idx`` is the row's position in its source file.
    """

    idx: np.ndarray
    query_ids: np.ndarray
    query_off: np.ndarray
    pos_ids: np.ndarray
    pos_off: np.ndarray
    neg_ids: np.ndarray
    neg_off: np.ndarray
    neg_row_off: np.ndarray
    keys: np.ndarray
    key_off: np.ndarray
    scores: np.ndarray
    score_off: np.ndarray

    def __len__(self) -> int:
        return len(self.idx)

    @classmethod
    def from_lists(
        cls,
        idx: Sequence[int],
        queries: Sequence[Sequence[int]],
        positives: Sequence[Sequence[int]],
        negatives: Sequence[Sequence[Sequence[int]]] | None = None,
        keys: Sequence[Sequence[int]] | None = None,
        scores: Sequence[Sequence[float]] | None = None,
    ) -> TokenizedSet:
        """Builds a set from Python lists. Without `keys`, texts are keyed by their token ids."""
        n = len(idx)
        negatives = negatives if negatives is not None else [[] for _ in range(n)]
        scores = scores if scores is not None else [[] for _ in range(n)]
        if keys is None:
            keys = [
                [_ids_key(q), _ids_key(p)] + [_ids_key(x) for x in ns]
                for q, p, ns in zip(queries, positives, negatives)
            ]
        if not (len(queries) == len(positives) == len(negatives) == len(keys) == len(scores) == n):
            raise ValueError("all per-example lists must have the same length")
        neg_rows = [r for ns in negatives for r in ns]

        def flat(rows: Sequence[Sequence[Any]], dtype: Any) -> np.ndarray:
            return np.fromiter((x for r in rows for x in r), dtype) if rows else np.zeros(0, dtype)

        return cls(
            np.asarray(idx, np.int64),
            flat(queries, np.int32),
            _offsets([len(q) for q in queries]),
            flat(positives, np.int32),
            _offsets([len(p) for p in positives]),
            flat(neg_rows, np.int32),
            _offsets([len(r) for r in neg_rows]),
            _offsets([len(ns) for ns in negatives]),
            flat(keys, np.int64),
            _offsets([len(k) for k in keys]),
            flat(scores, np.float32),
            _offsets([len(s) for s in scores]),
        )

    def validate(self, name: str = "") -> None:
        """Checks the offsets are consistent (catches a broken conversion early)."""
        n = len(self.idx)
        for field, off, data in (
            ("query", self.query_off, self.query_ids),
            ("positive", self.pos_off, self.pos_ids),
            ("neg_row", self.neg_row_off, None),
            ("keys", self.key_off, self.keys),
            ("scores", self.score_off, self.scores),
        ):
            if len(off) != n + 1 or off[0] != 0 or np.any(np.diff(off) < 0):
                raise ValueError(f"TokenizedSet {name}: bad {field} offsets")
            if data is not None and off[-1] != len(data):
                raise ValueError(
                    f"TokenizedSet {name}: {field} offsets end at {off[-1]}, data has {len(data)}"
                )
        if self.neg_off[-1] != len(self.neg_ids) or len(self.neg_off) != self.neg_row_off[-1] + 1:
            raise ValueError(f"TokenizedSet {name}: bad negatives offsets")
        nk = np.diff(self.key_off)
        nn = np.diff(self.neg_row_off)
        if np.any(nk != 2 + nn):
            raise ValueError(f"TokenizedSet {name}: each example needs 2 + #negatives text keys")
        ns = np.diff(self.score_off)
        if np.any((ns != 0) & (ns != 1 + nn)):
            raise ValueError(f"TokenizedSet {name}: scores must be empty or 1 + #negatives per example")

    def query(self, i: int) -> np.ndarray:
        return self.query_ids[self.query_off[i] : self.query_off[i + 1]]

    def positive(self, i: int) -> np.ndarray:
        return self.pos_ids[self.pos_off[i] : self.pos_off[i + 1]]

    def num_negatives(self, i: int) -> int:
        return int(self.neg_row_off[i + 1] - self.neg_row_off[i])

    def negative(self, i: int, j: int) -> np.ndarray:
        r = self.neg_row_off[i] + j
        return self.neg_ids[self.neg_off[r] : self.neg_off[r + 1]]

    def example_keys(self, i: int) -> np.ndarray:
        return self.keys[self.key_off[i] : self.key_off[i + 1]]

    def example_scores(self, i: int) -> np.ndarray:
        return self.scores[self.score_off[i] : self.score_off[i + 1]]

    def example_index(self, i: int) -> int:
        return int(self.idx[i])

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for a in (self.idx, self.query_off, self.pos_off, self.neg_row_off, self.keys):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]


def _ids_key(ids: Sequence[int]) -> int:
    return (
        int.from_bytes(hashlib.blake2b(np.asarray(ids, np.int32).tobytes(), digest_size=8).digest(), "little")
        >> 2
    )


# -------------------------------------------------------------------------------------------------- padding
@dataclasses.dataclass(frozen=True)
class Pick:
    """One batch row: example `i` of `task`, with the chosen negatives (indices into its negatives)."""

    task: str
    i: int
    negs: tuple[int, ...]


class BucketFeatureConverter:
    """Picks -> fixed-shape padded numpy arrays (the model's input features).

    Keys: ``query_ids``/``query_mask`` [B, Lq]; ``positive_ids``/``positive_mask`` [B, Ld]; with negatives
    ``negative_ids``/``negative_mask`` [B, K, Ld], ``negative_valid`` [B, K] and ``negative_index`` [B, K]
    (position in the example's negatives list, -1 where masked); ``scores`` [B, 1+K] and
    ``scores_valid`` [B, 1+K] (teacher / gold scores, valid where the example has them); ``task_id`` [B]
    (index into `task_names`); ``example_idx`` [B] (row in the source file). Lq and Ld are buckets
    (`bucket_lengths`).
    """

    def __init__(
        self,
        query_buckets: Sequence[int],
        doc_buckets: Sequence[int],
        *,
        num_negatives: int = 0,
        pad_id: int = 0,
        task_names: Sequence[str] = (),
        with_keys: bool = False,
    ):
        if not query_buckets or not doc_buckets:
            raise ValueError("bucket lists must not be empty")
        self.query_buckets = tuple(sorted(query_buckets))
        self.doc_buckets = tuple(sorted(doc_buckets))
        self.num_negatives = int(num_negatives)
        self.pad_id = int(pad_id)
        self.task_ids = {t: k for k, t in enumerate(task_names)}
        self.with_keys = bool(with_keys)

    def __call__(self, picks: Sequence[Pick], data: Mapping[str, TokenizedSet]) -> Batch:
        B, K = len(picks), self.num_negatives
        qs = [data[p.task].query(p.i) for p in picks]
        ps = [data[p.task].positive(p.i) for p in picks]
        ns = [[data[p.task].negative(p.i, j) for j in p.negs] for p in picks]
        lq, lp = [len(q) for q in qs], [len(x) for x in ps]
        mq, md = max(lq), max(lp + [len(x) for row in ns for x in row])
        Lq, Ld = bucket_for(mq, self.query_buckets), bucket_for(md, self.doc_buckets)
        if mq > Lq or md > Ld:
            raise ValueError(
                f"a sequence is longer than the largest bucket ({Lq}, {Ld}); tokenize with a lower "
                "max length or add a bucket"
            )
        out: Batch = {}
        out["query_ids"], out["query_mask"] = self._pad(qs, Lq, lq)
        out["positive_ids"], out["positive_mask"] = self._pad(ps, Ld, lp)
        if K:
            neg_ids = np.full((B, K, Ld), self.pad_id, np.int32)
            neg_mask = np.zeros((B, K, Ld), np.int32)
            valid = np.zeros((B, K), bool)
            index = np.full((B, K), -1, np.int32)
            for b, row in enumerate(ns):
                for k, x in enumerate(row[:K]):
                    neg_ids[b, k, : len(x)] = x
                    neg_mask[b, k, : len(x)] = 1
                    valid[b, k] = True
                    index[b, k] = picks[b].negs[k]
            out["negative_ids"], out["negative_mask"], out["negative_valid"] = neg_ids, neg_mask, valid
            out["negative_index"] = index
        scores = np.zeros((B, 1 + K), np.float32)
        svalid = np.zeros((B, 1 + K), bool)
        for b, p in enumerate(picks):
            s = data[p.task].example_scores(p.i)
            if len(s):
                chosen = [0] + [1 + j for j in p.negs[:K]]
                scores[b, : len(chosen)] = s[chosen]
                svalid[b, : len(chosen)] = True
        out["scores"], out["scores_valid"] = scores, svalid
        if self.with_keys:   # text keys for the loss's false-negative masks (0 where a negative is masked)
            ks = [data[p.task].example_keys(p.i) for p in picks]
            out["query_key"] = text_key_words(np.asarray([k[0] for k in ks], np.int64))
            out["positive_key"] = text_key_words(np.asarray([k[1] for k in ks], np.int64))
            if K:
                nk = np.zeros((B, K), np.int64)
                for b, p in enumerate(picks):
                    for k, j in enumerate(p.negs[:K]):
                        nk[b, k] = ks[b][2 + j]
                out["negative_key"] = text_key_words(nk)
        out["task_id"] = np.asarray([self.task_ids.get(p.task, -1) for p in picks], np.int32)
        out["example_idx"] = np.asarray([data[p.task].example_index(p.i) for p in picks], np.int64)
        return out

    def _pad(self, rows: Sequence[np.ndarray], length: int, lengths: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Rows (never longer than `length`) padded to `length`, and their masks."""
        keep = np.arange(length)[None, :] < np.asarray(lengths, np.int64)[:, None]
        ids = np.full((len(rows), length), self.pad_id, np.int32)
        if len(rows):
            ids[keep] = np.concatenate(rows)
        return ids, keep.astype(np.int32)


def text_key_words(keys: np.ndarray) -> np.ndarray:
    """int64 text keys [...] -> int32 [..., 2] (high, low word): the form the loss compares (JAX computes in
    32 bits; two words keep all 64 bits, so only equal texts compare equal, up to the hash)."""
    k = np.asarray(keys, np.int64)
    return np.stack([(k >> 32).astype(np.int32), (k & 0xFFFFFFFF).astype(np.uint32).view(np.int32)], axis=-1)


# --------------------------------------------------------------------------------------------- the iterator
def _rng(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) & 0xFFFFFFFF for w in words])))


def validate_rates(rates: Mapping[str, float], what: str = "mixture") -> dict[str, float]:
    """Non-negative finite rates, not all zero; returns those > 0 (zero-rate tasks are logged)."""
    if not rates:
        raise DataError(f"{what}: no tasks")
    for t, r in rates.items():
        if not np.isfinite(r) or r < 0:
            raise DataError(f"{what}: task {t!r} has rate {r}; rates must be finite and >= 0")
    live = {t: float(r) for t, r in rates.items() if r > 0}
    if not live:
        raise DataError(
            f"{what}: every task has rate 0 ({', '.join(f'{t}: {r}' for t, r in rates.items())}); "
            "nothing to sample"
        )
    dropped = sorted(set(rates) - set(live))
    if dropped:
        log.info("%s: tasks with rate 0 are not sampled: %s", what, dropped)
    return live


class ContrastiveBatchIterator:
    """Endless, resumable batches of `batch_size` rows from one host's tokenized tasks (see module docstring).

    Args:
      data: task name -> this host's `TokenizedSet`.
      rates: task name -> mixing rate (relative; a rate-0 task is not sampled). Default: task sizes.
      batch_size: rows per batch on this host (the global batch divided by the number of processes).
      converter: pads picks to arrays (default: buckets from the longest sequences, no negatives).
      num_negatives: hard negatives per row (sampled from the example's list each epoch; missing ones are
        masked).
      group_by_task: every batch holds one task (chosen by rate with a (seed, step) generator, the same on
        all hosts); else each row's task is drawn by rate.
      dedup: no text appears twice in a batch (rows whose query / positive would repeat one are deferred, not
        dropped; negatives that would repeat one are replaced by another of the example's, or masked).
      seed: base seed of every random choice.
      exclude_negative_keys: task -> text keys never used as negatives (queries / positives of other hosts).
    """

    def __init__(
        self,
        data: Mapping[str, TokenizedSet],
        batch_size: int,
        *,
        rates: Mapping[str, float] | None = None,
        converter: BucketFeatureConverter | None = None,
        num_negatives: int = 0,
        group_by_task: bool = True,
        dedup: bool = True,
        seed: int = 0,
        exclude_negative_keys: Mapping[str, Collection[int]] | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data = dict(sorted(data.items()))
        # in-memory sets are checked whole; sharded ones (`prepared.ShardedTask`, read on demand) were checked
        # when prepared and are never read whole: their order is a keyed permutation computed per position
        self._lazy = {name: not isinstance(ts, TokenizedSet) for name, ts in self.data.items()}
        for name, ts in self.data.items():
            if not self._lazy[name]:
                ts.validate(name)
        rates = rates if rates is not None else {t: float(len(ts)) for t, ts in self.data.items()}
        unknown = sorted(set(rates) - set(self.data))
        if unknown:
            raise DataError(f"rates name task(s) with no data: {unknown}")
        self.rates = validate_rates(rates)
        for t in self.rates:
            if len(self.data[t]) == 0:
                raise DataError(f"task {t!r} has no examples on this host (rate {self.rates[t]})")
        self.tasks = sorted(self.rates)
        p = np.asarray([self.rates[t] for t in self.tasks], np.float64)
        self._p = p / p.sum()
        self._cum_p = np.cumsum(self._p).tolist()
        self.batch_size = int(batch_size)
        self.num_negatives = int(num_negatives)
        if converter is None:
            if any(self._lazy.values()):
                raise ValueError("sharded data needs an explicit converter (the buckets of the prepared lengths)")
            qmax = max(int(np.diff(ts.query_off).max()) for ts in self.data.values() if len(ts))
            dmax = max(
                max(int(np.diff(ts.pos_off).max()), int(np.diff(ts.neg_off).max(initial=0)))
                for ts in self.data.values()
                if len(ts)
            )
            converter = BucketFeatureConverter(
                bucket_lengths(qmax),
                bucket_lengths(dmax),
                num_negatives=num_negatives,
                task_names=list(self.data),
            )
        if converter.num_negatives != self.num_negatives:
            raise ValueError(
                f"converter has num_negatives={converter.num_negatives}, iterator {self.num_negatives}"
            )
        self.converter = converter
        self.group_by_task = bool(group_by_task)
        self.dedup = bool(dedup)
        self.seed = int(seed)
        self._crc = {t: zlib.crc32(t.encode()) for t in self.data}
        self.dropped_negatives: dict[str, int] = {}
        self.skipped_negatives = 0  # negatives passed over because their text was already in the batch
        exclude = exclude_negative_keys or {}
        self._valid_negs = {
            t: None if self._lazy[t] else self._clean_negatives(t, ts, exclude.get(t, ()))
            for t, ts in self.data.items()
        }
        self._fingerprint = hashlib.sha256(
            "|".join(f"{t}:{ts.fingerprint()}" for t, ts in self.data.items()).encode()
        ).hexdigest()[:16]
        self._perm_cache: dict[tuple[str, int], np.ndarray] = {}
        self.step = 0
        self._pos = {t: {"epoch": 0, "position": 0, "deferred": []} for t in self.data}

    @property
    def task_names(self) -> list[str]:
        """Task names in the order of the batch's ``task_id``."""
        return sorted(self.converter.task_ids, key=self.converter.task_ids.get)

    # ------------------------------------------------------------------------------------------------- state
    def get_state(self) -> dict[str, Any]:
        """The iterator's position as a JSON-able dict (store it next to the model checkpoint)."""
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "seed": self.seed,
            "data": self._fingerprint,
            "tasks": {
                t: {"epoch": s["epoch"], "position": s["position"], "deferred": list(s["deferred"])}
                for t, s in self._pos.items()
            },
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restores `get_state()` output; the next batch is the one that followed it originally."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"iterator state version {state.get('version')!r}, expected {STATE_VERSION}")
        if state.get("data") != self._fingerprint:
            raise ValueError(
                "iterator state was saved for different data (another dataset, tokenizer, host shard "
                f"or process count): state {state.get('data')!r}, this iterator {self._fingerprint!r}"
            )
        if int(state["seed"]) != self.seed:
            raise ValueError(f"iterator state has seed {state['seed']}, this iterator {self.seed}")
        if set(state["tasks"]) != set(self._pos):
            raise ValueError(
                f"iterator state has tasks {sorted(state['tasks'])}, this iterator {sorted(self._pos)}"
            )
        self.step = int(state["step"])
        self._pos = {
            t: {
                "epoch": int(s["epoch"]),
                "position": int(s["position"]),
                "deferred": [int(i) for i in s["deferred"]],
            }
            for t, s in state["tasks"].items()
        }

    # --------------------------------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.converter(self.plan(), self.data)

    def plan(self) -> list[Pick]:
        """The next batch's rows (task, example, negatives), advancing the iterator's state; the converter turns
        them into arrays (`ParallelBatches` does that in worker processes)."""
        if len(self.tasks) == 1:
            slots = [self.tasks[0]] * self.batch_size
        elif self.group_by_task:   # one uniform draw from (seed, step): the same task on every host
            u = (_mix(self.seed, self.step, 0x5EED) >> 11) * (1.0 / (1 << 53))
            k = min(bisect.bisect_right(self._cum_p, u), len(self.tasks) - 1)
            slots = [self.tasks[k]] * self.batch_size
        else:
            rng = _rng(self.seed, self.step, 0x5EED)
            slots = [self.tasks[k] for k in rng.choice(len(self.tasks), size=self.batch_size, p=self._p)]
        used: set[int] = set()
        picks = [self._draw(t, used) for t in slots]
        self.step += 1
        return picks

    def _clean_negatives(self, task: str, ts: TokenizedSet, exclude: Collection[int]) -> list[np.ndarray]:
        """Per example, the negatives whose text is not its query, a positive of its query (in any example
        of the task), an earlier negative, nor in `exclude` (queries / positives held by other hosts)."""
        exclude = set(exclude)
        positives_of: dict[int, set[int]] = {}
        for i in range(len(ts)):
            k0 = int(ts.key_off[i])
            positives_of.setdefault(int(ts.keys[k0]), set()).add(int(ts.keys[k0 + 1]))
        out, dropped, foreign = [], 0, 0
        for i in range(len(ts)):
            k = ts.example_keys(i)
            seen = {int(k[0]), int(k[1])} | positives_of[int(k[0])]
            keep = []
            for j, kj in enumerate(k[2:].tolist()):
                if kj in seen:
                    dropped += 1
                elif kj in exclude:
                    foreign += 1
                else:
                    seen.add(kj)
                    keep.append(j)
            out.append(np.asarray(keep, np.int32))
        if dropped:
            log.warning(
                "task %r: %d negative(s) equal to their query, one of its positives or another negative are "
                "not used",
                task,
                dropped,
            )
        if foreign:
            log.info(
                "task %r: %d negative(s) are the query / positive of an example on another host and are not "
                "used (they could be a false negative in the global batch)",
                task,
                foreign,
            )
        self.dropped_negatives[task] = dropped + foreign
        return out

    def _perm(self, task: str, epoch: int) -> Any:
        key = (task, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 4 * len(self.data):
                self._perm_cache.clear()
            if self._lazy[task]:
                self._perm_cache[key] = KeyedPermutation(len(self.data[task]),
                                                         _mix(self.seed, self._crc[task], epoch, 0xE90C))
            else:
                self._perm_cache[key] = _rng(self.seed, self._crc[task], epoch, 0xE90C).permutation(
                    len(self.data[task]))
        return self._perm_cache[key]

    def _fits(self, ts: TokenizedSet, i: int, used: set[int]) -> np.ndarray | None:
        """Example i's text keys when its query and positive texts are both new to the batch, else None."""
        k = ts.example_keys(i)
        if self.dedup and (int(k[0]) in used or int(k[1]) in used):
            return None
        return k

    def _take(self, task: str, i: int, used: set[int], keys: np.ndarray) -> Pick:
        """Puts example i (text keys `keys`) in the batch: marks its texts used and chooses its negatives."""
        ts = self.data[task]
        if self.dedup:
            used.add(int(keys[0]))
            used.add(int(keys[1]))
        if not self.num_negatives:
            return Pick(task, i, ())
        vn = self._valid_negs[task]
        valid = np.arange(len(keys) - 2) if vn is None else vn[i]   # prepared data: cleaned when prepared
        if len(valid) > self.num_negatives:  # a fresh random subset each epoch, same on every run
            epoch, idx = self._pos[task]["epoch"], ts.example_index(i)
            valid = sorted(valid.tolist(), key=lambda j: _mix(self.seed, self._crc[task], epoch, idx, j))
        chosen: list[int] = []
        for j in valid:
            kj = int(keys[2 + j])
            if self.dedup and kj in used:  # its text is already in the batch: use another (or mask)
                self.skipped_negatives += 1
                continue
            if self.dedup:
                used.add(kj)
            chosen.append(int(j))
            if len(chosen) == self.num_negatives:
                break
        return Pick(task, i, tuple(sorted(chosen)))

    def _draw(self, task: str, used: set[int]) -> Pick:
        st = self._pos[task]
        ts = self.data[task]
        n = len(ts)
        for d, i in enumerate(st["deferred"]):
            keys = self._fits(ts, i, used)
            if keys is not None:
                del st["deferred"][d]
                return self._take(task, i, used, keys)
        scanned = 0
        while True:
            i = int(self._perm(task, st["epoch"])[st["position"]])
            st["position"] += 1
            if st["position"] == n:
                st["epoch"] += 1
                st["position"] = 0
            keys = self._fits(ts, i, used)
            if keys is not None:
                return self._take(task, i, used, keys)
            st["deferred"].append(i)
            scanned += 1
            if scanned > n or len(st["deferred"]) > max(n, 4 * self.batch_size):
                raise DataError(
                    f"task {task!r}: cannot fill a batch of {self.batch_size} rows without repeating a text "
                    f"({n} examples on this host, {len(st['deferred'])} waiting because they share text with "
                    "rows already in the batch); lower the batch size or pass dedup=False"
                )


class KeyedPermutation:
    """A pseudo-random permutation of ``range(n)`` computed per position (a 4-round Feistel network over the
    next even power of two, cycle-walking back into range), so shuffling 10M examples holds no index array.
    Same key, same permutation, on every host and run. Positions are computed a block of `BLOCK` at a time
    in NumPy (uint64 arithmetic wraps as the scalar `_encrypt` masks) and the last block is kept."""

    BLOCK = 1024

    def __init__(self, n: int, key: int):
        self.n, self.key = int(n), int(key)
        bits = max(2, (max(self.n - 1, 1)).bit_length())
        bits += bits % 2
        self.half = bits // 2
        self.mask = (1 << self.half) - 1
        self.round_keys = [_mix(self.key, r) | 1 for r in range(4)]
        self._block_start, self._block = -1, np.zeros(0, np.int64)

    def __len__(self) -> int:
        return self.n

    def _encrypt(self, x: int) -> int:
        """One Feistel pass over one position (the definition; `_encrypt_many` computes the same)."""
        left, right = x >> self.half, x & self.mask
        h, m = self.half, self.mask
        for k in self.round_keys:   # round function: multiply-xorshift of (right, key), top bits kept
            f = ((right + k) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
            left, right = right, left ^ ((f ^ (f >> 29)) >> (64 - h) & m if h else 0)
        return (left << h) | right

    def _encrypt_many(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        m = np.uint64(self.mask)
        left, right = x >> h, x & m
        with np.errstate(over="ignore"):
            for k in self.round_keys:
                f = (right + np.uint64(k)) * np.uint64(0x9E3779B97F4A7C15)
                g = ((f ^ (f >> np.uint64(29))) >> np.uint64(64 - self.half)) & m if self.half else np.zeros_like(f)
                left, right = right, left ^ g
        return (left << h) | right

    def _fill(self, start: int) -> None:
        x = self._encrypt_many(np.arange(start, min(start + self.BLOCK, self.n), dtype=np.uint64))
        out_of_range = x >= np.uint64(self.n)
        while out_of_range.any():      # cycle-walk the positions that left [0, n)
            x[out_of_range] = self._encrypt_many(x[out_of_range])
            out_of_range = x >= np.uint64(self.n)
        self._block_start, self._block = start, x.astype(np.int64)

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(i)
        j = i - self._block_start
        if not 0 <= j < len(self._block):
            self._fill(i - i % self.BLOCK)
            j = i - self._block_start
        return int(self._block[j])


def _mix(*words: int) -> int:
    """A 64-bit hash of small integers (splitmix64 steps): cheap, deterministic per-item random keys."""
    h = 0x9E3779B97F4A7C15
    for w in words:
        h = (h ^ (int(w) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h


# ----------------------------------------------------------------------------------------------- multi-host
class HostRows:
    """This process's rows of a global batch iterator (every process runs the same one): rows
    ``[i * B / n, (i + 1) * B / n)`` of each batch. Padded lengths are those of the global batch, so they agree
    across processes."""

    def __init__(self, it: ContrastiveBatchIterator, process_index: int, process_count: int):
        self.it, self.index, self.count = it, process_index, process_count

    def __iter__(self) -> "HostRows":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self.it)
        n = len(next(iter(batch.values())))
        lo, hi = self.index * n // self.count, (self.index + 1) * n // self.count
        return {k: v[lo:hi] for k, v in batch.items()}

    @property
    def task_names(self) -> list[str]:
        return self.it.task_names

    def get_state(self) -> dict[str, Any]:
        return self.it.get_state()

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.it.set_state(state)


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    """The rows each process contributes; the global batch must split evenly."""
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the {process_count} processes"
        )
    return global_batch_size // process_count


# ------------------------------------------------------------------------------------------ batch spec
# The one definition of what a training batch holds. The step embeds each tower input named here, AOT
# compiles against `batch_spec`, and the trainer sends only these keys to the devices.
TOWER_INPUTS: tuple[tuple[str, str, str], ...] = (
    # (embedding name the objective reads, batch key prefix: <prefix>_ids / <prefix>_mask, model tower)
    ("query", "query", "query"),
    ("document", "positive", "document"),
    ("negatives", "negative", "document"),
)
HOST_ONLY_KEYS: tuple[str, ...] = ("negative_index", "task_id", "example_idx")   # bookkeeping, never on devices


def with_text_keys(config: Any) -> bool:
    """Whether training batches carry text keys (``query_key`` ...): the loss masks false negatives."""
    return bool(config.loss.get("mask_false_negatives", False))


def batch_spec(config: Any, mesh: Any = None) -> dict[str, Any]:
    """{key: jax.ShapeDtypeStruct} of the device part of a global training batch at its largest bucket
    (`BucketFeatureConverter` pads to buckets up to these lengths); with `mesh`, each carries the batch
    sharding. Negatives appear when ``data.num_negatives`` > 0."""
    import jax
    import jax.numpy as jnp

    B, K = int(config.batch_size), int(config.data.num_negatives)
    Lq, Ld = int(config.max_query_length), int(config.max_document_length)
    shapes: dict[str, tuple[tuple[int, ...], Any]] = {
        "query_ids": ((B, Lq), jnp.int32), "query_mask": ((B, Lq), jnp.int32),
        "positive_ids": ((B, Ld), jnp.int32), "positive_mask": ((B, Ld), jnp.int32),
    }
    if K:
        shapes.update(negative_ids=((B, K, Ld), jnp.int32), negative_mask=((B, K, Ld), jnp.int32),
                      negative_valid=((B, K), jnp.bool_))
    shapes.update(scores=((B, 1 + K), jnp.float32), scores_valid=((B, 1 + K), jnp.bool_))
    if with_text_keys(config):
        shapes.update(query_key=((B, 2), jnp.int32), positive_key=((B, 2), jnp.int32))
        if K:
            shapes["negative_key"] = ((B, K, 2), jnp.int32)
    if mesh is None:
        return {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}
    from embedjax import sharding

    return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding.batch_sharding(mesh, len(s)))
            for k, (s, d) in shapes.items()}


def device_batch(local_batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The keys of an iterator's batch that go to the devices (`HOST_ONLY_KEYS` dropped)."""
    return {k: v for k, v in local_batch.items() if k not in HOST_ONLY_KEYS}


def batch_sharding(mesh: Any, data_axes: str | Sequence[str]) -> Any:
    """NamedSharding that splits dim 0 (the batch) over `data_axes` of `mesh` and replicates the rest."""
    from jax.sharding import NamedSharding, PartitionSpec

    axes = (data_axes,) if isinstance(data_axes, str) else tuple(data_axes)
    return NamedSharding(mesh, PartitionSpec(axes if len(axes) > 1 else axes[0]))


def make_global_batch(local_batch: Mapping[str, np.ndarray], sharding: Any) -> dict[str, Any]:
    """Each process's local rows -> global ``jax.Array``s sharded by `sharding` over the batch dimension.

    Every process passes its own `local_batch` (same keys, shapes and dtypes on all processes); the global
    batch dimension is the sum of the local ones, each process's rows landing on its own devices.
    """
    import jax

    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()
    }
