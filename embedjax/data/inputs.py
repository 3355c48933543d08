"""The training data a config names, prepared once and streamed: file sources, seqio Tasks / Mixtures and TFDS
datasets by name, all through `embedjax.data.prepared`.

==================  ============================================================================================
``data.kind``       reads
==================  ============================================================================================
``files``           ``data.sources``: globs of JSONL / Parquet / TFRecord / ArrayRecord files, local or gs://,
                    one task each, with a field mapping, an instruction and a rate (`embedjax.data.records`)
``seqio``           ``data.mixture``: a registered seqio Task or Mixture (``data.module`` is imported first, so
                    the module that registers it can be named in the config); its tasks yield text features
                    (`text_features`); a Mixture's rates are the mixing rates
``tfds``            ``data.tfds_name``: a TFDS dataset by name (``name[/config][:version]``, from
                    ``data.tfds_data_dir``), fields renamed by ``data.fields``
``prepared``        ``data.path``: a folder written by ``embedjax prepare``
==================  ============================================================================================

The first three are prepared into ``data.prepared_dir`` (default ``WORKDIR/prepared``) on first use, by process
0 while the others wait, or ahead of time by ``embedjax prepare --config ...`` (same folder, same fingerprint:
training then only reads the manifest). Instructions per task: a source's ``instruction``, a row's
``instruction`` field, or ``data.instructions[task]``; ``data.instruction`` for the rest.
"""
from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

from embedjax.data import prepared, records
from embedjax.data.sources import DataError

log = logging.getLogger(__name__)

STREAMED_KINDS = ("files", "seqio", "tfds", "prepared")


def text_features(*, negatives: bool = True, scores: bool = False, titles: bool = False) -> dict[str, Any]:
    """seqio ``output_features`` of a text task embedjax can train on (strings; embedjax tokenises them with
    the model's own tokenizer when it prepares the data)::

        seqio.TaskRegistry.add("nq", source=..., preprocessors=[...], output_features=text_features())
    """
    import seqio
    import tensorflow as tf

    v = seqio.PassThroughVocabulary(size=0)

    def f(rank: int, dtype: Any = tf.string, required: bool = True) -> Any:
        return seqio.Feature(v, add_eos=False, dtype=dtype, rank=rank, required=required)

    out = {"query": f(0), "positive": f(0)}
    if titles:
        out["positive_title"] = f(0, required=False)
    if negatives:
        out["negatives"] = f(1, required=False)
        if titles:
            out["negative_titles"] = f(1, required=False)
    if scores:
        out["scores"] = f(1, tf.float32, required=False)
    return out


def _py(v: Any) -> Any:
    """A numpy value from tf.data -> plain Python (bytes -> str, arrays -> lists)."""
    import numpy as np

    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.ndarray):
        return [_py(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [_py(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def _rows(ds: Any) -> Iterator[dict[str, Any]]:
    for ex in ds.as_numpy_iterator():
        yield {k: _py(v) for k, v in ex.items()}


def seqio_inputs(mixture: str, split: str, *, num_shards: int, instructions: Mapping[str, str],
                 module: str = "") -> tuple[list[prepared.InputShard], dict[str, float]]:
    """Input shards (task x shard i of `num_shards`) of a registered seqio Task / Mixture, and its rates."""
    import seqio

    if module:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise DataError(f"data.module {module!r} cannot be imported ({e})") from None
    try:
        provider = seqio.get_mixture_or_task(mixture)
    except ValueError:
        raise DataError(f"data.mixture {mixture!r} is not a registered seqio Task or Mixture (registered: "
                        f"{sorted(seqio.MixtureRegistry.names()) + sorted(seqio.TaskRegistry.names())}; set "
                        "data.module to the module that registers it)") from None
    tasks = [provider] if isinstance(provider, seqio.Task) else list(provider.tasks)
    rates = ({provider.name: 1.0} if isinstance(provider, seqio.Task)
             else {t.name: float(provider.get_rate(t)) for t in tasks})
    inputs = []
    for task in sorted(tasks, key=lambda t: t.name):
        feats = task.output_features
        tokenised = [k for k in ("query", "positive") if k in feats and feats[k].dtype != "string"
                     and getattr(feats[k].dtype, "name", "") != "string"]
        if tokenised or "query" not in feats or "positive" not in feats:
            raise DataError(f"seqio task {task.name!r}: embedjax reads text features 'query' and 'positive' "
                            "(strings; it tokenises them with the model's tokenizer); register the task with "
                            "output_features=embedjax.data.inputs.text_features()")
        src = records.check_source({"name": task.name, "files": f"seqio:{task.name}",
                                    "instruction": instructions.get(task.name, "")})
        for i in range(num_shards):
            def examples(task=task, i=i, src=src):
                ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1,
                                      shard_info=seqio.ShardInfo(i, num_shards) if num_shards > 1 else None,
                                      use_cached=False, trim_output_features=False)
                for n, row in enumerate(_rows(ds), 1):
                    yield records.to_example(row, src, f"seqio task {task.name!r} ({split}, shard {i}): row {n}")
            inputs.append(prepared.InputShard(f"seqio:{task.name}:{split}:{i}/{num_shards}", src, examples))
    return inputs, rates


def tfds_inputs(name: str, split: str, *, num_shards: int, fields: Mapping[str, str], instructions: Mapping[str, str],
                data_dir: str = "") -> list[prepared.InputShard]:
    """Input shards of a TFDS dataset by name (its split in `num_shards` even parts); task = the dataset's
    name (without config / version)."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:  # noqa: BLE001 - tfds raises several kinds (not found, not registered)
        raise DataError(f"data.tfds_name {name!r}: {type(e).__name__}: {e}") from None
    if split not in builder.info.splits:
        raise DataError(f"data.tfds_name {name!r} has splits {sorted(builder.info.splits)}, not {split!r}")
    task = name.split(":")[0].split("/")[0]
    src = records.check_source({"name": task, "files": f"tfds:{name}", "fields": dict(fields),
                                "instruction": instructions.get(task, "")})
    parts = tfds.even_splits(split, n=num_shards) if num_shards > 1 else [split]
    inputs = []
    for i, part in enumerate(parts):
        def examples(part=part, i=i):
            ds = builder.as_dataset(split=part, shuffle_files=False)
            for n, row in enumerate(_rows(ds), 1):
                yield records.to_example(row, src, f"tfds {name!r} ({part}): row {n}")
        inputs.append(prepared.InputShard(f"tfds:{name}:{part}", src, examples))
    return inputs


def config_inputs(config: Any) -> tuple[list[prepared.InputShard], dict[str, float] | None]:
    """(input shards, mixing rates or None) of a config's ``data`` section (kinds files / seqio / tfds)."""
    d = config.data
    instructions = dict(d.get("instructions") or {})
    if d.kind == "files":
        if not d.sources:
            raise DataError("config: data.kind='files' needs data.sources (a list of {name, files, ...})")
        sources = [dict(s) for s in d.sources]
        for s in sources:
            if not s.get("instruction") and instructions.get(s.get("name", "")):
                s["instruction"] = instructions[s["name"]]
        return prepared.file_inputs(sources), None
    if d.kind == "seqio":
        if not d.mixture:
            raise DataError("config: data.kind='seqio' needs data.mixture (a registered Task or Mixture)")
        return seqio_inputs(d.mixture, d.split, num_shards=int(d.num_shards), instructions=instructions,
                            module=d.module)
    if d.kind == "tfds":
        if not d.tfds_name:
            raise DataError("config: data.kind='tfds' needs data.tfds_name")
        return tfds_inputs(d.tfds_name, d.split, num_shards=int(d.num_shards), fields=dict(d.fields or {}),
                           instructions=instructions, data_dir=d.tfds_data_dir), None
    raise DataError(f"config: data.kind {d.kind!r} is not prepared by embedjax.data.inputs")


def prepared_dir(config: Any, workdir: Any) -> str:
    d = config.data
    if d.kind == "prepared":
        if not d.path:
            raise DataError("config: data.kind='prepared' needs data.path (a folder written by embedjax prepare)")
        return str(d.path)
    return str(d.prepared_dir) if d.prepared_dir else f"{str(workdir).rstrip('/')}/prepared"


def prepare_for_config(config: Any, tokenizer: Any, out_dir: str, *, show_progress: bool | None = None
                       ) -> dict[str, Any]:
    """Prepares the config's data (kinds files / seqio / tfds) into `out_dir`; returns the manifest."""
    inputs, rates = config_inputs(config)
    d = config.data
    return prepared.prepare(inputs, tokenizer, out_dir, max_query_length=int(config.max_query_length),
                            max_doc_length=int(config.max_document_length),
                            prompts=(d.query_prompt, d.document_prompt), instruction=d.instruction,
                            document_instruction=d.document_instruction, rows_per_shard=int(d.rows_per_shard),
                            show_progress=show_progress, extra_spec={"rates": rates})


def train_iterator(config: Any, tokenizer: Any, workdir: Any, *, process_index: int | None = None,
                   process_count: int | None = None) -> Any:
    """The resumable iterator of this process over the config's streamed data, preparing it on first use."""
    import jax

    from embedjax.data.pipeline import with_text_keys

    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    root = prepared_dir(config, workdir)
    if config.data.kind != "prepared":
        manifest = records.as_path(root) / "manifest.json"
        if pi == 0:
            prepare_for_config(config, tokenizer, root)
        elif pc > 1:
            _wait_for(manifest)
    data = prepared.PreparedData(root, cache_dir=os.environ.get("EMBEDJAX_PREPARED_CACHE") or None)
    if config.data.kind == "prepared":
        _check_matches(config, tokenizer, data)
    rates = data.manifest.get("rates")
    return prepared.build_iterator(
        data, global_batch_size=int(config.batch_size), max_query_length=int(config.max_query_length),
        max_doc_length=int(config.max_document_length), num_negatives=int(config.data.num_negatives),
        group_by_task=bool(config.data.one_task_per_batch), seed=int(config.seed), process_index=pi,
        process_count=pc, host_order=config.data.host_order, rates=rates, with_keys=with_text_keys(config),
        workers=int(config.data.workers))


def _wait_for(path: Any, timeout_s: float = 24 * 3600) -> None:
    """Waits for process 0 to finish preparing (its manifest appears last)."""
    t0, said = time.monotonic(), 0.0
    while not path.exists():
        if time.monotonic() - t0 > timeout_s:
            raise DataError(f"{path}: process 0 has not finished preparing the data after {timeout_s:.0f} s")
        if time.monotonic() - said > 60:
            log.info("waiting for process 0 to prepare the data (%s)", path.parent)
            said = time.monotonic()
        time.sleep(2.0)


def _check_matches(config: Any, tokenizer: Any, data: prepared.PreparedData) -> None:
    """A prepared folder named by data.path must have been made with this model's tokenizer and prompts."""
    m, d = data.manifest, config.data
    if m["tokenizer"] != prepared.tokenizer_fingerprint(tokenizer):
        raise DataError(f"{data.root}: prepared with another tokenizer ({m['tokenizer']}) than the model's "
                        f"({prepared.tokenizer_fingerprint(tokenizer)}); prepare it again for this model")
    want = [d.query_prompt, d.document_prompt]
    if list(m["prompts"]) != want:
        raise DataError(f"{data.root}: prepared with prompts {m['prompts']}, the config has {want}; the model would "
                        "be evaluated and served with other prompts than it was trained on")


def describe(manifest: Mapping[str, Any]) -> str:
    """A short human summary of a manifest (tasks, examples, shards)."""
    lines = [f"{manifest['stats']['examples']} examples, {len(manifest['shards'])} shards, "
             f"{manifest['stats']['dropped_negatives']} negatives dropped (equal to their query / positive / "
             f"another negative), {manifest['stats']['truncated']} texts truncated"]
    for t, info in sorted(manifest["tasks"].items()):
        lines.append(f"  {t}: {info['examples']} examples in {info['shards']} shards, rate "
                     f"{info['rate'] if info.get('rate') is not None else 'by size'}, instruction "
                     f"{info['instruction']!r}")
    return "\n".join(lines)



# ------------------------------------------------------------------------------------------------------ CLI
def add_parser(sub: Any) -> None:
    p = sub.add_parser("prepare", help="tokenise a config's training data once into indexed shards",
                       description="Reads the config's data (data.kind files / seqio / tfds), renders each task's "
                                   "prompt, tokenises with the model's tokenizer and writes indexed shards where "
                                   "`embedjax train` looks for them (data.prepared_dir, default WORKDIR/prepared). "
                                   "Resumable: run it again after a failure. Overrides: --config.KEY=VALUE.")
    p.add_argument("--config", required=True, help="configs/NAME.py[:variant]")
    p.add_argument("--workdir", default=None, help="the training run's workdir (shards go to WORKDIR/prepared "
                                                   "unless the config sets data.prepared_dir)")
    p.add_argument("--out", default=None, help="write here instead (then train with --config.data.prepared_dir=OUT)")
    p.set_defaults(func=run)


def run(args: Any) -> int:
    from embedjax.config import load_config
    from embedjax.errors import CLIError
    from embedjax.models.source import resolve
    from embedjax.tokenize import TextTokenizer

    config = load_config(args.config, list(getattr(args, "config_overrides", []) or []))
    if config.data.kind not in ("files", "seqio", "tfds"):
        raise CLIError(f"data.kind {config.data.kind!r} is not prepared (prepare reads kinds files, seqio, tfds)")
    if not (args.out or args.workdir or config.data.prepared_dir):
        raise CLIError("give --workdir (the run's) or --out, or set data.prepared_dir in the config")
    out = args.out or prepared_dir(config, args.workdir or "")
    source = resolve(config, weights=False)
    tok = TextTokenizer(source.tokenizer, int(config.max_document_length))
    manifest = prepare_for_config(config, tok, out)
    print(f"prepared {out}:\n{describe(manifest)}")
    if args.out and args.out != prepared_dir(config, args.workdir or ""):
        print(f"train on it with --config.data.prepared_dir={args.out}")
    return 0
