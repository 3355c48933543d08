"""`train_and_evaluate(config, workdir)`: the training loop, called by the CLI, tests and notebooks alike.

Evaluates before and after (and every `eval.every_steps`), logs JSON lines (+ TensorBoard when TensorFlow is
installed), checkpoints with Orbax (resuming from the workdir's latest checkpoint), and writes the final model as
a sentence-transformers folder.
"""
from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np

from embedjax import sharding
from embedjax.config import ConfigDict
from embedjax.models.dual_encoder import ModelConfig

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------- pieces

def init_checkpoint(init_from: str) -> tuple[Any, int | None] | None:
    """`init_from` naming another run's checkpoint: "WORKDIR" (its latest) or "WORKDIR@STEP" -> (workdir,
    step); None for a pretrained model folder / hub id."""
    from embedjax.checkpoint import as_path

    path, _, step = str(init_from).partition("@")
    if "://" not in path:
        path = str(Path(path).absolute())
    p = as_path(path)
    try:
        is_run = (p / "config.json").exists() and (p / "checkpoints").exists()
    except Exception:  # noqa: BLE001 - e.g. a hub id that is no path at all
        return None
    if not is_run:
        if step:
            raise ValueError(f"init_from {init_from!r}: @STEP needs a training workdir (config.json + checkpoints/)")
        return None
    if step and not step.isdigit():
        raise ValueError(f"init_from {init_from!r}: the part after @ must be a step number")
    return p, (int(step) if step else None)


def load_model(config: ConfigDict, *, weights: bool = True):
    """(ModelConfig, pretrained params or None, HF tokenizer, tokenizer folder). `weights=False` reads the
    pretrained folder's configuration only (resume, export: the weights come from a checkpoint). `init_from`
    may name another training run ("WORKDIR[@STEP]"): its model config and tokenizer, weights None (the
    trainer restores them from that run's checkpoint)."""
    from embedjax.config import read_workdir_config
    from embedjax.models.convert import load_folder, resolve_model_dir
    from embedjax.tokenize import load_tokenizer

    max_len = max(config.max_query_length, config.max_document_length)
    run = init_checkpoint(config.init_from) if config.init_from else None
    if run is not None:
        cfg, _, tok, tdir = load_model(read_workdir_config(run[0]), weights=False)
        if max_len > cfg.max_length:
            import dataclasses
            cfg = dataclasses.replace(cfg, max_length=max_len)
        return cfg, None, tok, tdir
    if config.init_from:
        cfg, params, tdir, _ = load_folder(config.init_from, weights=weights)
        if max_len > cfg.max_length:
            import dataclasses
            cfg = dataclasses.replace(cfg, max_length=max_len)
        return cfg, params, load_tokenizer(tdir), tdir
    cfg = ModelConfig.from_dict(config.model_config.to_dict())
    tdir = resolve_model_dir(config.tokenizer)
    return cfg, None, load_tokenizer(tdir), tdir


def build_train_iterator(config: ConfigDict, model_dir: Path):
    """The per-host resumable iterator from the configured data (seqio task over a local TFDS builder)."""
    from embedjax.data import tasks
    from embedjax.data.prompts import prompt_from_config
    from embedjax.data.tf_tokenize import load_vocabulary
    from embedjax.data.tfds_builders import prepare_dataset

    d = config.data
    kind = {"beir": "beir", "pairs": "pairs", "stsb": "scored_pairs"}[d.kind]
    builder = prepare_dataset(kind, d.path, splits=(d.split,) if kind == "beir" else None, on_error=d.on_error)
    vocab = load_vocabulary(model_dir)
    prompt = prompt_from_config(d.query_prompt, d.document_prompt)   # the one prompt language
    name = "embedjax_train"
    tasks.add_task(name, builder, vocab, prompt=prompt, symmetric=(kind == "scored_pairs"))
    split = d.split if kind == "beir" else "train"
    return tasks.build_iterator(name, split, global_batch_size=config.batch_size,
                                max_query_length=config.max_query_length,
                                max_doc_length=config.max_document_length, num_negatives=d.num_negatives,
                                dedup=kind != "scored_pairs", seed=config.seed, host_order=d.host_order)


def build_evaluators(config: ConfigDict) -> dict[str, Any]:
    """Evaluators from `eval.tasks` entries "beir:FOLDER[:split]" / "stsb:FILE_OR_FOLDER[:split]"."""
    from embedjax.evaluate import RetrievalEvaluator, STSEvaluator

    out = {}
    for spec in config.eval.tasks:
        kind, _, rest = spec.partition(":")
        path, _, split = rest.partition(":")
        split = split or "test"
        name = f"{kind}/{Path(path).name}/{split}"
        if kind == "beir":
            out[name] = RetrievalEvaluator.from_beir(path, split=split, use_cache=False, show_progress=False,
                                                     query_prompt=config.data.query_prompt or None,
                                                     document_prompt=config.data.document_prompt or None)
        elif kind == "stsb":
            out[name] = STSEvaluator.from_file(path, split=split, show_progress=False)
        else:
            raise ValueError(f"eval.tasks entry {spec!r}: kind must be beir or stsb")
    return out


class MetricWriter:
    """JSON lines (metrics.jsonl) + TensorBoard event files (tensorboardX) when installed; process 0 only.
    Local workdirs append; object stores (gs://, no append) get the whole file rewritten on each write."""

    def __init__(self, workdir: Any):
        self.enabled = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self._remote = "://" in str(workdir)
        self._lines: list[str] = []
        self._tb = None
        if self.enabled:
            if self._remote and self.path.exists():
                self._lines = self.path.read_text().splitlines(keepends=True)
            try:
                from tensorboardX import SummaryWriter
                if self._remote and str(workdir).startswith("gs://"):
                    from tensorboardX import record_writer
                    if not record_writer.GCS_ENABLED:
                        raise RuntimeError("TensorBoard events on gs:// need google-cloud-storage "
                                           "(pip install 'embedjax[tpu]')")
                self._tb = SummaryWriter(str(workdir / "tensorboard"))
            except ImportError:
                log.info("tensorboardX not installed: metrics go to %s only (no TensorBoard)", self.path)
            except Exception as e:  # noqa: BLE001 - e.g. gs:// without google-cloud-storage
                log.warning("no TensorBoard events (%s: %s); metrics go to %s", type(e).__name__, e, self.path)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": step, **metrics}) + "\n"
        if self._remote:
            self._lines.append(line)
            self.path.write_text("".join(self._lines))
        else:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k.replace("@", "_at_"), v, step)
            self._tb.flush()


class PreemptionWatcher:
    """SIGTERM (what Cloud TPU VMs send before preemption / maintenance) -> stop at a step boundary that every
    process agrees on. Multi-process: JAX's preemption sync manager (started by `jax.distributed.initialize`,
    which catches SIGTERM itself) picks the step; single process: a SIGTERM handler sets a flag."""

    def __init__(self):
        self.requested = False
        self._old = None
        self._sync = False
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            try:
                multihost_utils.reached_preemption_sync_point(0)
                self._sync = True
            except RuntimeError:   # preemption service disabled: own handler, agreed by an allgather per step
                pass
        if not self._sync and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self.requested = True

    def reached(self, step: int) -> bool:
        """True at the step where every process should checkpoint and stop (call it at every step)."""
        if self._sync:
            from jax.experimental import multihost_utils
            return bool(multihost_utils.reached_preemption_sync_point(step))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            return bool(np.max(multihost_utils.process_allgather(np.asarray([int(self.requested)], np.int32))))
        return self.requested

    def close(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None


def _close_bounded(ckpt: Any, timeout: float | None) -> None:
    if timeout is None:
        ckpt.close()
        return
    t = threading.Thread(target=ckpt.close, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        log.warning("pending checkpoint save did not finish within %.0fs (another process lost?)", timeout)


def _copy_tree(src: Path, dst: Any) -> None:
    """Copies a local folder to an epath (gs://) destination."""
    for p in sorted(src.rglob("*")):
        if p.is_file():
            target = dst / p.relative_to(src).as_posix()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(p.read_bytes())


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# --------------------------------------------------------------------------------------------- main entry

def train_and_evaluate(config: ConfigDict, workdir: str | Path, *,
                       train_iter: Iterator[dict[str, np.ndarray]] | None = None,
                       stop_requested: Callable[[], bool] | None = None,
                       devices: Any = None) -> dict[str, Any]:
    """Trains per `config` in `workdir` (a local path or gs://); returns {"before": {...}, "after": {...},
    "final_step": n, "preempted": bool, ...}. SIGTERM, or `stop_requested()` returning True, checkpoints at
    the next step boundary and returns early (run again with the same workdir to resume). `devices`: the
    devices of the mesh (default: all)."""
    from embedjax.checkpoint import Checkpointer, as_path
    from embedjax.data.pipeline import device_batch
    from embedjax.encoder import Encoder
    from embedjax.experiment import assemble

    # Everything that can reject the config runs before the workdir is touched: keys and named choices,
    # prompts, the mesh, the batch split, the objective and the optimizer.
    workdir = as_path(str(workdir) if "://" in str(workdir) else Path(workdir).absolute())
    lead = jax.process_index() == 0
    mesh = sharding.make_mesh(dict(config.mesh), devices=devices)
    exp = assemble(config, mesh)
    if lead:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())

    ckpt = Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints,
                        keep_best=config.keep_best_checkpoints, best_metric=config.best_metric,
                        best_mode=config.best_mode)
    resuming = ckpt.latest_step() is not None
    model_cfg, pretrained, tokenizer, model_dir = load_model(config, weights=not resuming)
    if train_iter is None:
        train_iter = build_train_iterator(config, model_dir)
    rng = jax.random.key(config.seed)

    start = 0
    if resuming:
        # resume: build the state abstractly (nothing allocated, pretrained weights not needed) and restore
        # each shard straight onto its devices, whatever mesh wrote the checkpoint
        abstract, shards = exp.abstract_state(model_cfg)
        state, data_state, start = ckpt.restore(abstract)
        if data_state is not None and hasattr(train_iter, "set_state"):
            train_iter.set_state(data_state)
        log.info("resuming from %s step %d", ckpt.directory, start)
    else:
        run = init_checkpoint(config.init_from) if config.init_from else None
        if run is not None:   # another run's model weights (not its optimizer state), read onto this mesh
            abstract, _ = exp.abstract_state(model_cfg)
            src = Checkpointer(run[0] / "checkpoints", read_only=True)
            try:
                restored, src_step = src.restore_subtree({"params": {"model": abstract.params["model"]}}, run[1])
            finally:
                src.close()
            pretrained = restored["params"]["model"]
            log.info("starting from %s step %d (model weights; fresh optimizer state, step 0)", run[0], src_step)
        state, shards = exp.create_state(model_cfg, rng, pretrained=pretrained)
        if config.init_from and run is None:
            log.info("starting from pretrained %s", config.init_from)
        elif not config.init_from:
            log.info("starting from scratch (seed %d)", config.seed)
    pretrained = None

    step_fn = exp.train_step(model_cfg, shards)
    evaluators = build_evaluators(config)
    encoder = Encoder(model_cfg, state.params["model"], tokenizer, name=str(workdir), mesh=mesh)
    writer = MetricWriter(workdir)
    preemption = PreemptionWatcher()
    results: dict[str, Any] = {"preempted": False}

    def evaluate(tag: str, step: int) -> dict[str, float]:
        from embedjax.evaluate import encode_fn_from_encoder
        encoder.params = state.params["model"]
        encoder.__dict__.pop("fingerprint", None)
        out = {}
        for name, ev in evaluators.items():
            t0 = time.time()
            m = ev.run(encode_fn_from_encoder(encoder, batch_size=config.eval.batch_size))
            out.update({f"{name}/{k}": float(v) for k, v in m.items() if isinstance(v, (int, float))})
            log.info("eval %s step %d %s: %s (%.0fs)", tag, step, name,
                     ", ".join(f"{k}={v:.4f}" for k, v in m.items() if isinstance(v, float)), time.time() - t0)
        writer.write(step, {f"eval/{k}": v for k, v in out.items()})
        return out

    if evaluators and config.eval.before and start == 0:
        results["before"] = evaluate("before", 0)

    pending = None   # metrics of the previous step, fetched after the next is dispatched
    t_start, n_done = time.time(), 0

    def drain(pending):
        s, m = pending
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        if not all(math.isfinite(v) for v in m.values()):
            bad = [k for k, v in m.items() if not math.isfinite(v)]
            where = f"{ckpt.directory} step {last_ckpt}" if last_ckpt is not None else "none saved yet"
            raise TrainingDiverged(f"step {s}: non-finite {', '.join(bad)}; last good checkpoint: {where}")
        return s, m

    step, last_ckpt = start, (start if start else None)
    data_state = train_iter.get_state() if hasattr(train_iter, "get_state") else None

    def _loop() -> None:
        nonlocal state, pending, t_start, n_done, step, last_ckpt, data_state
        with jax.set_mesh(mesh):
            while step < config.num_steps:
                batch = sharding.global_batch(device_batch(next(train_iter)), mesh)
                data_state = train_iter.get_state() if hasattr(train_iter, "get_state") else None
                state, metrics = step_fn(state, batch)
                step += 1
                n_done += 1
                if pending is not None:
                    s, m = drain(pending)
                    if s == start + 1:   # rates exclude the first step (compilation)
                        t_start, n_done = time.time(), 1
                    if s % config.log_every_steps == 0 or s == start + 1:
                        el = time.time() - t_start
                        sps = (n_done - 1) / el if n_done > 1 else float("nan")
                        eta = _fmt_eta((config.num_steps - s) / sps) if sps == sps else "?"
                        log.info("step %d/%d  loss %.4f  acc %.3f  %.2f step/s  %.1f ex/s  ETA %s", s, config.num_steps,
                                 m["loss"], m.get("accuracy", float("nan")), sps, sps * config.batch_size, eta)
                        writer.write(s, {f"train/{k}": v for k, v in m.items()})
                pending = (step, metrics)
                stop = preemption.reached(step) or (stop_requested() if stop_requested else False)
                eval_metrics = None
                if evaluators and config.eval.every_steps and step % config.eval.every_steps == 0 \
                        and step < config.num_steps and not stop:
                    eval_metrics = results.setdefault("during", {})[step] = evaluate("during", step)
                if (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0) or stop \
                        or (eval_metrics is not None and config.keep_best_checkpoints):
                    ckpt.save(step, state, data_state, metrics=eval_metrics)
                    last_ckpt = step
                if stop:
                    log.warning("%s: checkpoint of step %d saved; run the same command again to resume",
                                "preempted (SIGTERM)" if preemption.requested or preemption._sync else
                                "stop requested", step)
                    results["preempted"] = True
                    break
            if pending is not None:
                s, m = drain(pending)
                writer.write(s, {f"train/{k}": v for k, v in m.items()})
                results["last_train_metrics"] = m

    try:
        _loop()
        results["final_step"] = step
        after = None
        if step >= config.num_steps and evaluators:
            after = results["after"] = evaluate("after", step)
        if last_ckpt != step:
            ckpt.save(step, state, data_state, metrics=after)
    except BaseException:
        # finish pending async saves (the last good checkpoint) before the error propagates; with several
        # processes the save's barriers may wait on a dead peer, so the wait is bounded
        _close_bounded(ckpt, None if jax.process_count() == 1 else 30.0)
        raise
    else:
        ckpt.close()
    finally:
        preemption.close()
        writer.close()
    if step >= config.num_steps and config.export_final and lead:
        encoder.params = state.params["model"]
        if "://" in str(workdir):
            import tempfile
            with tempfile.TemporaryDirectory() as tmp:
                _copy_tree(encoder.save(Path(tmp) / "final"), workdir / "final")
        else:
            encoder.save(Path(str(workdir)) / "final")
        results["final_model"] = str(workdir / "final")
    if lead:
        (workdir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    results["state"] = state
    return results
