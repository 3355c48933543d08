"""TFDS builders over local files (no network): pairs / triplets, scored pairs (STS-B) and BEIR folders.

`prepare_dataset(kind, files)` reads the files with `embedjax.data.sources`, writes a TFDS dataset once under
``data_dir`` (``$EMBEDJAX_TFDS_DIR`` or ``~/.cache/embedjax/tfds``) and returns the builder; later calls with
the same file contents reuse it (the config name is a hash of the contents, the kind and the error policy).
Every kind is written with one feature schema (the `sources.Example` record plus ``idx``, the row's position
in its file), so seqio tasks and the batch iterator handle all of them alike. Lines skipped with
``on_error="skip"`` are counted in ``builder.info.metadata["read_stats"]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import tensorflow as tf
import tensorflow_datasets as tfds

from embedjax.data import sources
from embedjax.data.sources import DataError, OnError, PairKind

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1.0.0"


def default_data_dir() -> Path:
    return Path(os.environ.get("EMBEDJAX_TFDS_DIR") or Path.home() / ".cache" / "embedjax" / "tfds")


@dataclasses.dataclass(eq=False)
class LocalFilesConfig(tfds.core.BuilderConfig):
    """Which files to read, as what: ``files`` is ((split, path), ...); for BEIR every path is the folder."""

    kind: str = "pairs"
    files: tuple[tuple[str, str], ...] = ()
    on_error: str = "raise"


class EmbedjaxLocal(tfds.core.GeneratorBasedBuilder):
    """Training examples from local files, in the one schema of `embedjax.data.sources.Example`."""

    VERSION = tfds.core.Version(SCHEMA_VERSION)
    RELEASE_NOTES = {
        SCHEMA_VERSION: "query / positive (+ title) / negatives (+ titles) / scores / ids / idx."
    }

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description="embedjax training examples from local files.",
            features=tfds.features.FeaturesDict(
                {
                    "idx": tf.int64,
                    "query": text,
                    "positive": text,
                    "positive_title": text,
                    "negatives": tfds.features.Sequence(text),
                    "negative_titles": tfds.features.Sequence(text),
                    "scores": tfds.features.Sequence(tf.float32),
                    "query_id": text,
                    "positive_id": text,
                }
            ),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,  # keep file order: row i has idx i
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        cfg: LocalFilesConfig = self.builder_config  # type: ignore[assignment]
        gens: dict[str, Iterator] = {}
        stats: dict[str, Any] = {}
        for split, path in cfg.files:
            examples, st = sources.read_examples(cfg.kind, path, split, on_error=cfg.on_error)  # type: ignore[arg-type]
            stats[split] = st.to_dict()
            gens[split] = self._generate_examples(examples)
        self.info.metadata["read_stats"] = stats
        return gens

    def _generate_examples(self, examples: list[sources.Example]) -> Iterator[tuple[int, dict]]:
        for i, ex in enumerate(examples):
            yield i, dict(ex, idx=i)


def _hash_files(kind: str, files: tuple[tuple[str, str], ...], on_error: str) -> str:
    h = hashlib.sha256(f"{SCHEMA_VERSION}|{kind}|{on_error}".encode())
    for split, path in files:
        h.update(split.encode())
        p = Path(path)
        members = (
            [p / "corpus.jsonl", p / "queries.jsonl", p / "qrels" / f"{split}.tsv"] if kind == "beir" else [p]
        )
        for m in members:
            if not m.is_file():
                raise FileNotFoundError(f"{m}: no such file")
            with open(m, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def prepare_dataset(
    kind: PairKind,
    files: str | os.PathLike | Mapping[str, str | os.PathLike],
    *,
    splits: tuple[str, ...] | None = None,
    data_dir: str | os.PathLike | None = None,
    on_error: OnError = "raise",
) -> tfds.core.DatasetBuilder:
    """Builds (once) and returns the TFDS builder for local files.

    `files`: {split: path}, or one path (split "train"); for ``kind="beir"`` the BEIR folder, whose splits are
    `splits` or every ``qrels/*.tsv``.
    """
    if kind not in ("pairs", "scored_pairs", "beir"):
        raise ValueError(f"unknown data kind {kind!r}; expected 'pairs', 'scored_pairs' or 'beir'")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if kind == "beir":
        if isinstance(files, Mapping):
            raise ValueError("for kind='beir' pass the BEIR folder (and optionally splits=...)")
        folder = Path(files)
        if splits is None:
            splits = tuple(sorted(p.stem for p in (folder / "qrels").glob("*.tsv")))
            if not splits:
                raise DataError(f"{folder}: no qrels/*.tsv files")
        file_map = {s: folder for s in splits}
    elif isinstance(files, Mapping):
        file_map = {s: Path(p) for s, p in files.items()}
    else:
        file_map = {"train": Path(files)}
    if not file_map:
        raise ValueError("no files given")
    items = tuple(sorted((s, str(Path(p).resolve())) for s, p in file_map.items()))
    name = f"{kind}_{_hash_files(kind, items, on_error)}"
    cfg = LocalFilesConfig(name=name, version=SCHEMA_VERSION, kind=kind, files=items, on_error=on_error)
    builder = EmbedjaxLocal(config=cfg, data_dir=str(data_dir or default_data_dir()))
    from embedjax.quiet import captured_native_stderr, quiet_tfds, verbose_requested

    quiet_tfds()
    fresh = not builder.is_prepared()
    t0 = time.time()
    if fresh:
        log.info("preparing %s data from %s (once; cached in %s)", kind, ", ".join(p for _, p in items),
                 builder.data_dir)
    # TFDS prints a download banner to stdout even for local files: kept out of the user's output
    with contextlib.nullcontext() if verbose_requested() else contextlib.redirect_stdout(io.StringIO()), \
            captured_native_stderr():
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
        )
    if fresh:
        log.info("prepared %s data in %.1fs", kind, time.time() - t0)
    for split, st in (builder.info.metadata.get("read_stats") or {}).items():
        if st.get("skipped"):
            log.warning(
                "%s (%s): %d malformed line(s) were skipped when the dataset was built; first: %s",
                st["path"],
                split,
                st["skipped"],
                st["first_skipped"],
            )
    return builder
