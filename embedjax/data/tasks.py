"""seqio Tasks and Mixtures for contrastive training from local files, and the bridge to the batch iterator.

A task is ``TFDS dataset (tfds_builders) -> text keys -> prompt -> tokenize (the model's own tokenizer)``,
run on batches of 256 examples (``batch_examples`` ... ``unbatch_examples``):

    vocab = tf_tokenize.load_vocabulary(model_dir)               # same ids as the model's HF tokenizer
    add_task("scifact", prepare_dataset("beir", "embedjax/data/shipped/scifact"), vocab,
             prompt=prompt_preset("e5"))
    add_task("stsb", prepare_dataset("scored_pairs", {"train": ".../stsb/train.tsv"}), vocab, symmetric=True)
    add_mixture("mix", [("scifact", 1.0), ("stsb", 0.5)])
    it = build_iterator("mix", "train", global_batch_size=64, max_query_length=64, max_doc_length=256)
    batch = next(it)                                            # fixed-shape numpy arrays, see pipeline.py

Output features of every task: ``query`` int32 [L], ``positive`` int32 [L], ``negatives`` int32 [K, (L)]
(ragged), plus ``idx``, ``keys`` (int64 hashes of the raw query / document texts, for deduplication) and
``scores``. ``sequence_length`` must give ``query`` and ``positive`` (documents, negatives included); each
sequence is truncated to it with the model's special tokens kept, as ``tokenizer(text, truncation=True,
max_length=L)`` does.

Sharding over hosts is done by the data source (`LocalTfdsSource`) when seqio passes it a ``ShardInfo``:
``shard_by="text_groups"`` (default) puts examples that share a query or positive text on the same host
(connected components of the "shares a text" graph, assigned greedily to the least-loaded host), and
`build_iterator` drops, on each host, the negatives whose text is a query / positive held by another host.
With each host deduplicating its own rows, no query or positive text then appears twice in the global batch
and no positive comes back as another row's negative. (Two hosts may still pick the same hard negative in one
step: a repeated negative column, not a false negative.) ``shard_by="index"`` reads contiguous 1/N slices
with ``tfds.even_splits`` (reads only its part of the files, but the same text may land in two hosts' rows).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from embedjax.data import tf_tokenize
from embedjax.data.pipeline import (
    BucketFeatureConverter,
    ContrastiveBatchIterator,
    HostRows,
    TokenizedSet,
    local_batch_size,
    validate_rates,
)
from embedjax.data.prompts import Prompt, strip_tf
from embedjax.data.sources import DataError
from embedjax.tokenize import bucket_lengths

log = logging.getLogger(__name__)

ShardBy = Literal["text_groups", "index"]
_KEY_BUCKETS = 2**62


# ------------------------------------------------------------------------------------------------ text keys
def doc_text_tf(title: tf.Tensor, text: tf.Tensor) -> tf.Tensor:
    """``(title + " " + text).strip()`` on string tensors (any shape, or ragged with equal row splits)."""
    return strip_tf(tf.strings.join([title, " ", text]))


def text_key_tf(texts: tf.Tensor) -> tf.Tensor:
    """int64 key of each text (64-bit fingerprint of the stripped text): equal texts get equal keys."""
    return tf.strings.to_hash_bucket_fast(strip_tf(texts), _KEY_BUCKETS)


def _on_strings(fn, *xs: Any) -> Any:
    """Applies an elementwise string function to dense tensors or to ragged ones (same row splits)."""
    if isinstance(xs[0], tf.RaggedTensor):
        return xs[0].with_flat_values(fn(*(x.flat_values for x in xs)))
    return fn(*xs)


def example_keys_tf(ex: Mapping[str, tf.Tensor]) -> tf.Tensor | tf.RaggedTensor:
    """Keys of raw examples: [query, positive document, negative documents...]: int64 [2 + K] for one
    example, ragged [B, (2 + K)] for a batch (`batch_examples`)."""
    q = text_key_tf(ex["query"])
    p = text_key_tf(doc_text_tf(ex["positive_title"], ex["positive"]))
    n = _on_strings(lambda t, x: text_key_tf(doc_text_tf(t, x)), ex["negative_titles"], ex["negatives"])
    if ex["query"].shape.rank == 0:
        return tf.concat([q[tf.newaxis], p[tf.newaxis], n], axis=0)
    qp = tf.RaggedTensor.from_tensor(tf.stack([q, p], axis=1))
    return tf.concat([qp, n], axis=1)


# --------------------------------------------------------------------------------------------------- source
class LocalTfdsSource(seqio.DataSource):
    """A seqio DataSource over a prepared `tfds_builders.EmbedjaxLocal` builder; shards by text groups."""

    def __init__(self, builder: tfds.core.DatasetBuilder, *, shard_by: ShardBy = "text_groups"):
        if shard_by not in ("text_groups", "index"):
            raise ValueError(f"shard_by must be 'text_groups' or 'index', got {shard_by!r}")
        self.builder = builder
        self.shard_by = shard_by
        splits = tuple(builder.info.splits.keys())
        super().__init__(
            splits=splits, num_input_examples={s: builder.info.splits[s].num_examples for s in splits}
        )
        self._plans: dict[tuple[str, int], tuple[np.ndarray, dict[int, int]]] = {}

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    def list_shards(self, split: str) -> Sequence[str]:
        return [split]

    def get_dataset(
        self,
        split: str = "train",
        shuffle: bool = False,
        seed: int | None = None,
        shard_info: seqio.ShardInfo | None = None,
        *,
        sequence_length: Any = None,
        use_cached: bool = False,
        num_epochs: int | None = 1,
    ) -> tf.data.Dataset:
        """Examples of `split` in file order (`shuffle` is ignored: the batch iterator orders them)."""
        if split not in self.splits:
            raise DataError(f"split {split!r} not in this dataset (has {list(self.splits)})")
        read = tfds.ReadConfig(shuffle_seed=0, interleave_cycle_length=1)
        if shard_info is None or shard_info.num_shards == 1:
            return self.builder.as_dataset(split=split, shuffle_files=False, read_config=read)
        if self.shard_by == "index":
            part = tfds.even_splits(split, shard_info.num_shards)[shard_info.index]
            return self.builder.as_dataset(split=part, shuffle_files=False, read_config=read)
        owner = tf.constant(self.shard_owners(split, shard_info.num_shards), tf.int32)
        ds = self.builder.as_dataset(split=split, shuffle_files=False, read_config=read)
        return ds.filter(lambda ex: tf.equal(tf.gather(owner, ex["idx"]), shard_info.index))

    def shard_owners(self, split: str, num_shards: int) -> np.ndarray:
        """Host of each example (int32 [n]) such that examples sharing a query or positive text have the
        same host."""
        key = (split, num_shards)
        if key not in self._plans:
            self._plans[key] = _text_group_plan(self.builder, split, num_shards)
        return self._plans[key][0]

    def foreign_keys(self, split: str, num_shards: int, index: int) -> set[int]:
        """Text keys of the queries / positives held by the other hosts (with ``shard_by="text_groups"``):
        a negative with one of these texts could be a false negative in the global batch."""
        if self.shard_by != "text_groups" or num_shards == 1:
            return set()
        self.shard_owners(split, num_shards)
        return {k for k, h in self._plans[(split, num_shards)][1].items() if h != index}


def _text_group_plan(
    builder: tfds.core.DatasetBuilder, split: str, num_shards: int
) -> tuple[np.ndarray, dict[int, int]]:
    """(host of each example, host of each query / positive text key): union-find over "shares a query or
    positive text", then whole groups to hosts. Negatives do not join groups (mined hard negatives would glue
    most of a dataset into one group); the iterator keeps them apart instead (`foreign_keys`)."""
    n = builder.info.splits[split].num_examples
    ds = builder.as_dataset(
        split=split, shuffle_files=False, read_config=tfds.ReadConfig(interleave_cycle_length=1)
    )
    ds = ds.ragged_batch(4096).map(
        lambda ex: {"idx": ex["idx"], "keys": example_keys_tf(ex)},
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    parent = np.arange(n)

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    first: dict[int, int] = {}
    for b in ds:
        for i, ks in zip(b["idx"].numpy().tolist(), b["keys"].to_list()):
            for k in ks[:2]:  # query, positive
                j = first.setdefault(k, i)
                if j != i:
                    ra, rb = find(int(i)), find(j)
                    if ra != rb:
                        parent[max(ra, rb)] = min(ra, rb)
    roots = np.fromiter((find(i) for i in range(n)), np.int64, n)
    uniq, inverse, sizes = np.unique(roots, return_inverse=True, return_counts=True)
    if len(uniq) < num_shards:
        raise DataError(
            f"{builder.info.full_name} ({split}): only {len(uniq)} group(s) of examples that share no text, "
            f"fewer than the {num_shards} hosts; use shard_by='index' or fewer hosts"
        )
    # Greedy balancing: biggest groups first (ties by first row), each to the least loaded host.
    order = sorted(range(len(uniq)), key=lambda g: (-sizes[g], uniq[g]))
    load = np.zeros(num_shards, np.int64)
    group_owner = np.zeros(len(uniq), np.int32)
    for g in order:
        h = int(np.argmin(load))  # least loaded host, lowest index on ties
        group_owner[g] = h
        load[h] += sizes[g]
    if load.max() > 1.2 * load.mean():
        log.warning(
            "%s (%s): text groups split unevenly over %d hosts (examples per host %s)",
            builder.info.full_name,
            split,
            num_shards,
            load.tolist(),
        )
    owners = group_owner[inverse]
    return owners, {k: int(owners[i]) for k, i in first.items()}  # a key's examples share one host


# -------------------------------------------------------------------------------------------- preprocessors
# The task's preprocessors run on batches of examples (string ops are far cheaper per batch than per example):
# batch_examples -> add_text_keys -> apply_prompt -> tokenize_pairs -> unbatch_examples. The middle three
# accept single examples too.
def batch_examples(ds: tf.data.Dataset, batch_size: int = 256) -> tf.data.Dataset:
    """Groups examples into ragged batches for the vectorised preprocessors."""
    return ds.ragged_batch(batch_size)


def unbatch_examples(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Back to one example per element (what seqio validates and what the batch iterator reads)."""
    return ds.unbatch()


def add_text_keys(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Adds ``keys`` (int64 [2 + K] per example) computed from the raw texts, before any prompt."""
    return ds.map(lambda ex: dict(ex, keys=example_keys_tf(ex)), num_parallel_calls=tf.data.AUTOTUNE)


def apply_prompt(ds: tf.data.Dataset, prompt: Prompt, symmetric: bool = False) -> tf.data.Dataset:
    """Formats ``query`` with the query template and ``positive`` / ``negatives`` with the document template
    (or the query template too when `symmetric`, e.g. STS sentence pairs)."""

    def fmt(ex: dict) -> dict:
        ex = dict(ex)
        ex["query"] = prompt.format_query_tf(ex["query"])
        if symmetric:
            ex["positive"] = prompt.format_query_tf(ex["positive"])
            ex["negatives"] = _on_strings(prompt.format_query_tf, ex["negatives"])
        else:
            ex["positive"] = prompt.format_document_tf(ex["positive"], ex["positive_title"])
            ex["negatives"] = _on_strings(prompt.format_document_tf, ex["negatives"], ex["negative_titles"])
        return ex

    return ds.map(fmt, num_parallel_calls=tf.data.AUTOTUNE)


_KEEP = ("idx", "keys", "scores")


def tokenize_pairs(
    ds: tf.data.Dataset,
    output_features: Mapping[str, seqio.Feature],
    sequence_length: Mapping[str, int] | None,
    batch_size: int = 256,
) -> tf.data.Dataset:
    """Tokenizes query / positive / negatives with the model's special tokens, truncated to
    ``sequence_length``. On batches (`batch_examples`) directly; single examples are batched by `batch_size`
    for the call and unbatched after."""
    if not sequence_length or "query" not in sequence_length or "positive" not in sequence_length:
        raise ValueError(
            "sequence_length must give 'query' and 'positive' lengths, e.g. {'query': 64, 'positive': 256}"
        )
    vocab = output_features["query"].vocabulary
    lq, ld = int(sequence_length["query"]), int(sequence_length["positive"])

    def tok(b: dict) -> dict:
        out = {k: b[k] for k in _KEEP}
        out["query"] = tf_tokenize.encode_tf(vocab, b["query"], lq)
        out["positive"] = tf_tokenize.encode_tf(vocab, b["positive"], ld)
        negs = b["negatives"]  # [B, (K)]
        ids = tf_tokenize.encode_tf(vocab, negs.flat_values, ld)  # [sum K, (L)]
        out["negatives"] = tf.RaggedTensor.from_row_splits(ids, negs.row_splits)
        return out

    ds = ds.map(lambda ex: {k: ex[k] for k in _KEEP + ("query", "positive", "negatives")})
    if ds.element_spec["query"].shape.rank == 0:
        return ds.ragged_batch(batch_size).map(tok, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    return ds.map(tok, num_parallel_calls=tf.data.AUTOTUNE)


# ------------------------------------------------------------------------------------------------- registry
def add_task(
    name: str,
    source: LocalTfdsSource | tfds.core.DatasetBuilder,
    vocabulary: tf_tokenize.ModelVocabulary,
    *,
    prompt: Prompt | None = None,
    symmetric: bool = False,
    shard_by: ShardBy = "text_groups",
    replace: bool = True,
) -> seqio.Task:
    """Registers a contrastive-pairs seqio Task (see module docstring) and returns it."""
    if not hasattr(vocabulary, "spec"):
        raise TypeError(
            "vocabulary must come from embedjax.data.tf_tokenize.load_vocabulary / make_vocabulary "
            f"(it carries the model's special tokens), got {type(vocabulary).__name__}"
        )
    if not isinstance(source, LocalTfdsSource):
        source = LocalTfdsSource(source, shard_by=shard_by)
    if name in seqio.TaskRegistry.names():
        if not replace:
            raise ValueError(f"seqio task {name!r} is already registered")
        seqio.TaskRegistry.remove(name)
    feats = {
        "query": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32),
        "positive": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32),
        "negatives": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32, rank=2, required=False),
    }
    return seqio.TaskRegistry.add(
        name,
        source=source,
        output_features=feats,
        shuffle_buffer_size=None,
        preprocessors=[
            batch_examples,
            add_text_keys,
            functools.partial(apply_prompt, prompt=prompt or Prompt(), symmetric=symmetric),
            tokenize_pairs,
            unbatch_examples,
        ],
    )


def add_mixture(name: str, tasks: Sequence[tuple[str, float]], *, replace: bool = True) -> seqio.Mixture:
    """Registers a seqio Mixture after checking the rates (finite, >= 0, not all 0)."""
    validate_rates(dict(tasks), f"mixture {name!r}")
    if name in seqio.MixtureRegistry.names():
        if not replace:
            raise ValueError(f"seqio mixture {name!r} is already registered")
        seqio.MixtureRegistry.remove(name)
    return seqio.MixtureRegistry.add(name, list(tasks))


def task_rates(name: str) -> dict[str, float]:
    """Task name -> rate of a registered Task (rate 1) or Mixture (sub-mixtures flattened)."""
    provider = seqio.get_mixture_or_task(name)
    if isinstance(provider, seqio.Task):
        return {provider.name: 1.0}
    try:
        return {t.name: float(provider.get_rate(t)) for t in provider.tasks}
    except ZeroDivisionError:
        raise DataError(f"mixture {name!r}: a sub-mixture has every rate 0") from None


# ------------------------------------------------------------------------------------------------- to numpy
def to_tokenized_set(ds: tf.data.Dataset, batch_size: int = 1024) -> TokenizedSet:
    """A tokenized task dataset (output of `tokenize_pairs`) -> `TokenizedSet`, ordered by ``idx``."""
    parts: dict[str, list[np.ndarray]] = {
        k: [] for k in ("idx", "q", "ql", "p", "pl", "n", "nl", "nk", "k", "kl", "s", "sl")
    }
    for b in ds.ragged_batch(batch_size):
        parts["idx"].append(b["idx"].numpy())
        for f, a, lens in (
            ("query", "q", "ql"),
            ("positive", "p", "pl"),
            ("keys", "k", "kl"),
            ("scores", "s", "sl"),
        ):
            r = b[f]
            parts[a].append(r.flat_values.numpy())
            parts[lens].append(r.row_lengths().numpy())
        negs = b["negatives"]  # [B, (K), (L)]
        parts["nk"].append(negs.row_lengths().numpy())
        parts["n"].append(negs.flat_values.numpy())
        parts["nl"].append(negs.values.row_lengths().numpy())
    if not parts["idx"]:
        return TokenizedSet.from_lists([], [], [])
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    ts = TokenizedSet(
        cat["idx"].astype(np.int64),
        cat["q"].astype(np.int32),
        _off(cat["ql"]),
        cat["p"].astype(np.int32),
        _off(cat["pl"]),
        cat["n"].astype(np.int32),
        _off(cat["nl"]),
        _off(cat["nk"]),
        cat["k"].astype(np.int64),
        _off(cat["kl"]),
        cat["s"].astype(np.float32),
        _off(cat["sl"]),
    )
    order = np.argsort(ts.idx, kind="stable")
    if np.any(order != np.arange(len(order))):
        ts = _reorder(ts, order)
    ts.validate()
    return ts


def _off(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _reorder(ts: TokenizedSet, order: np.ndarray) -> TokenizedSet:
    def take(data: np.ndarray, off: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = [data[off[i] : off[i + 1]] for i in order]
        return (np.concatenate(rows) if rows else data[:0]), _off(
            np.asarray([len(r) for r in rows], np.int64)
        )

    q, qo = take(ts.query_ids, ts.query_off)
    p, po = take(ts.pos_ids, ts.pos_off)
    k, ko = take(ts.keys, ts.key_off)
    s, so = take(ts.scores, ts.score_off)
    rows = [list(range(ts.neg_row_off[i], ts.neg_row_off[i + 1])) for i in order]
    flat_rows = [r for rr in rows for r in rr]
    n = (
        np.concatenate([ts.neg_ids[ts.neg_off[r] : ts.neg_off[r + 1]] for r in flat_rows])
        if flat_rows
        else ts.neg_ids[:0]
    )
    no = _off(np.asarray([ts.neg_off[r + 1] - ts.neg_off[r] for r in flat_rows], np.int64))
    return TokenizedSet(
        ts.idx[order], q, qo, p, po, n, no, _off(np.asarray([len(r) for r in rows], np.int64)), k, ko, s, so
    )


def load_tokenized(
    name: str, split: str, sequence_length: Mapping[str, int], *, shard_index: int = 0, num_shards: int = 1
) -> dict[str, TokenizedSet]:
    """Runs each task (rate > 0) of a registered Task / Mixture on this host's shard; returns the tokens."""
    rates = validate_rates(task_rates(name), f"{name!r}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} not in [0, {num_shards})")
    shard = seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None
    out: dict[str, TokenizedSet] = {}
    for t in sorted(rates):
        task = seqio.TaskRegistry.get(t)
        ds = task.get_dataset(
            sequence_length=dict(sequence_length),
            split=split,
            shuffle=False,
            num_epochs=1,
            shard_info=shard,
            trim_output_features=False,
            use_cached=False,
        )
        out[t] = to_tokenized_set(ds)
        if not len(out[t]):
            raise DataError(f"task {t!r} ({split}): no examples on host {shard_index} of {num_shards}")
    return out


def build_iterator(
    name: str,
    split: str,
    *,
    global_batch_size: int,
    max_query_length: int,
    max_doc_length: int,
    num_negatives: int = 0,
    group_by_task: bool = True,
    dedup: bool = True,
    seed: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    host_order: str = "per_host",
    with_keys: bool = False,
) -> ContrastiveBatchIterator | HostRows:
    """The training iterator of this process, batches of ``global_batch_size / process_count`` rows padded to
    bucket lengths (defaults: ``jax.process_index()`` / ``jax.process_count()``).

    ``host_order="per_host"``: each process reads and tokenizes only its shard of every task of `name`.
    Negatives whose text is a query / positive held by another host are not used, so no row's positive can
    come back as another host's negative in the global batch. ``host_order="global"``: every process reads
    all the data and takes its rows of one global order, so the global batches (and the training run) do not
    depend on the number of processes, and a run can resume on another host count."""
    if host_order not in ("per_host", "global"):
        raise ValueError(f"host_order must be 'per_host' or 'global', got {host_order!r}")
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if host_order == "global" and process_count > 1:
        local_batch_size(global_batch_size, process_count)   # checks divisibility
        it = build_iterator(name, split, global_batch_size=global_batch_size, max_query_length=max_query_length,
                            max_doc_length=max_doc_length, num_negatives=num_negatives,
                            group_by_task=group_by_task, dedup=dedup, seed=seed, process_index=0,
                            process_count=1, with_keys=with_keys)
        return HostRows(it, process_index, process_count)
    local = local_batch_size(global_batch_size, process_count)
    rates = validate_rates(task_rates(name), f"{name!r}")
    data = load_tokenized(
        name,
        split,
        {"query": max_query_length, "positive": max_doc_length},
        shard_index=process_index,
        num_shards=process_count,
    )
    vocab = seqio.TaskRegistry.get(sorted(rates)[0]).output_features["query"].vocabulary
    foreign: set[int] = set()
    if num_negatives and dedup and process_count > 1:
        for t in rates:
            src = seqio.TaskRegistry.get(t).source
            if isinstance(src, LocalTfdsSource):
                foreign |= src.foreign_keys(split, process_count, process_index)
    conv = BucketFeatureConverter(
        bucket_lengths(max_query_length),
        bucket_lengths(max_doc_length),
        num_negatives=num_negatives,
        pad_id=vocab.spec.pad_id,
        task_names=sorted(rates),
        with_keys=with_keys,
    )
    return ContrastiveBatchIterator(
        data,
        local,
        rates=rates,
        converter=conv,
        num_negatives=num_negatives,
        group_by_task=group_by_task,
        dedup=dedup,
        seed=seed,
        exclude_negative_keys={t: foreign for t in data} if foreign else None,
    )
