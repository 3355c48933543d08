"""`train_and_evaluate(config, workdir)`: the training loop, called by the CLI, tests and notebooks alike.

Evaluates before and after (and every `eval.every_steps`), logs JSON lines (+ TensorBoard when TensorFlow is
installed), checkpoints with Orbax (resuming from the workdir's latest checkpoint), and writes the final model as
a sentence-transformers folder.
"""
from __future__ import annotations

import dataclasses
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
from embedjax.progress import fmt_duration
from embedjax.summary import peak_rss_bytes

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------- pieces

def build_train_iterator(config: ConfigDict, model_dir: Path, *, hf_tokenizer: Any = None, workdir: Any = None):
    """The per-host resumable iterator of the configured data: streamed prepared shards (data.kind files /
    seqio / tfds / prepared, `embedjax.data.inputs`) or the shipped-format readers (beir / pairs / stsb, a
    seqio task over a local TFDS builder, read whole on each host)."""
    from embedjax.data import inputs

    if config.data.kind in inputs.STREAMED_KINDS:
        from embedjax.tokenize import TextTokenizer, load_tokenizer

        tok = TextTokenizer(hf_tokenizer if hf_tokenizer is not None else load_tokenizer(model_dir),
                            int(config.max_document_length))
        return inputs.train_iterator(config, tok, workdir)
    from embedjax.data import tasks
    from embedjax.data.pipeline import with_text_keys
    from embedjax.data.prompts import config_prompt
    from embedjax.data.tf_tokenize import load_vocabulary
    from embedjax.data.tfds_builders import prepare_dataset

    d = config.data
    kind = {"beir": "beir", "pairs": "pairs", "stsb": "scored_pairs"}[d.kind]
    builder = prepare_dataset(kind, d.path, splits=(d.split,) if kind == "beir" else None, on_error=d.on_error)
    vocab = load_vocabulary(model_dir)
    prompt = config_prompt(d)   # the one prompt language
    name = "embedjax_train"
    tasks.add_task(name, builder, vocab, prompt=prompt, symmetric=(kind == "scored_pairs"))
    split = d.split if kind == "beir" else "train"
    return tasks.build_iterator(name, split, global_batch_size=config.batch_size,
                                max_query_length=config.max_query_length,
                                max_doc_length=config.max_document_length, num_negatives=d.num_negatives,
                                dedup=kind != "scored_pairs", seed=config.seed, host_order=d.host_order,
                                group_by_task=bool(d.one_task_per_batch),
                                with_keys=with_text_keys(config))


def build_evaluators(config: ConfigDict) -> dict[str, Any]:
    """Evaluators from `eval.tasks` entries "beir:FOLDER[:split]" / "stsb:FILE_OR_FOLDER[:split]"."""
    from embedjax.evaluate import RetrievalEvaluator, STSEvaluator

    from embedjax.data.prompts import config_prompt_strings

    query_prompt, document_prompt = config_prompt_strings(config.data)
    out = {}
    for spec in config.eval.tasks:
        kind, _, rest = spec.partition(":")
        path, _, split = rest.partition(":")
        split = split or "test"
        name = f"{kind}/{Path(path).name}/{split}"
        if kind == "beir":
            out[name] = RetrievalEvaluator.from_beir(path, split=split, use_cache=False, show_progress=None,
                                                     query_prompt=query_prompt or None,
                                                     document_prompt=document_prompt or None)
        elif kind == "stsb":
            out[name] = STSEvaluator.from_file(path, split=split, show_progress=None)
        else:
            raise ValueError(f"eval.tasks entry {spec!r}: kind must be beir or stsb")
    return out


class MetricWriter:
    """JSON lines (metrics.jsonl) + TensorBoard event files (tensorboardX) when installed; process 0 only.
    Local workdirs append; object stores (gs://, no append) get the whole file rewritten on each write. On an
    object store the TensorBoard events are written to a local folder and each events file is copied to
    ``<workdir>/tensorboard`` after every write (through etils.epath, the client every other workdir file
    uses): tensorboardX's own gs:// writer uploads again when it is garbage-collected, even after close()."""

    def __init__(self, workdir: Any):
        self.enabled = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self._remote = "://" in str(workdir)
        self._lines: list[str] = []
        self._tb = None
        self._tb_remote = workdir / "tensorboard"
        self._tb_local: Path | None = None
        if self.enabled:
            if self._remote and self.path.exists():
                self._lines = self.path.read_text().splitlines(keepends=True)
            try:
                from tensorboardX import SummaryWriter
                logdir = str(self._tb_remote)
                if self._remote:
                    import tempfile
                    self._tb_local = Path(tempfile.mkdtemp(prefix="embedjax_tensorboard_"))
                    logdir = str(self._tb_local)
                self._tb = SummaryWriter(logdir)
            except ImportError:
                log.info("tensorboardX not installed: metrics go to %s only (no TensorBoard)", self.path)

    def _upload_events(self) -> None:
        for p in sorted(self._tb_local.iterdir()):
            (self._tb_remote / p.name).write_bytes(p.read_bytes())

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
            if self._tb_local is not None:
                self._upload_events()
        if self._tb_local is not None:
            import shutil
            shutil.rmtree(self._tb_local, ignore_errors=True)
            self._tb_local = None

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
            if self._tb_local is not None:
                self._upload_events()


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


# --------------------------------------------------------------------------------------------- the run

@dataclasses.dataclass
class Run:
    """What the loop and its actions share: the state being trained and where the run stands."""

    config: ConfigDict
    mesh: Any
    workdir: Any
    ckpt: Any                              # embedjax.checkpoint.Checkpointer
    writer: MetricWriter
    evaluator: Callable[[str, int, Any], dict[str, float]] | None   # (tag, step, model params); None: none
    state: Any                             # TrainState on the mesh
    start: int                             # the step this process started (or resumed) at
    step: int
    data_state: Any = None                 # the iterator's state after the last batch taken
    task_names: list = dataclasses.field(default_factory=list)   # tasks of the data (one per batch: logged)
    last_ckpt: int | None = None
    stop: bool = False                     # preemption / stop requested: checkpoint and leave the loop
    eval_metrics: dict[str, float] | None = None   # this step's evaluation, if one ran
    results: dict[str, Any] = dataclasses.field(default_factory=lambda: {"preempted": False})

    model_params: Callable[[dict], Any] = lambda params: params["model"]   # the Experiment's: LoRA merged

    def evaluate(self, tag: str) -> dict[str, float]:
        return self.evaluator(tag, self.step, self.model_params(self.state.params))


class Action:
    """Periodic work after each step (t5x `BaseAction`, clu periodic actions): `begin(run)` before the first
    step, `__call__(run, metrics)` after every step, `finish(run)` once after the loop."""

    def begin(self, run: Run) -> None:
        pass

    def __call__(self, run: Run, metrics: dict[str, Any]) -> None:
        raise NotImplementedError

    def finish(self, run: Run) -> None:
        pass


class LogMetrics(Action):
    """Fetches each step's metrics one step late (the next step is already dispatched, so the host never
    waits on the device), stops on a non-finite value, and logs every `log_every_steps`, and at least every
    30 s (`EMBEDJAX_PROGRESS_SECONDS`), with rate and ETA."""

    def __init__(self, config: ConfigDict):
        from embedjax.progress import _every

        self.every, self.total, self.batch = config.log_every_steps, config.num_steps, config.batch_size
        self.pending: tuple[int, Any] | None = None
        self.seconds = _every()
        self.begin(None)

    def begin(self, run: Run | None) -> None:
        self.t0 = self.last_line = time.time()
        self.timed = 0

    def _drain(self, run: Run) -> tuple[int, dict[str, float]]:
        s, m = self.pending
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        bad = [k for k, v in m.items() if not math.isfinite(v)]
        if bad:
            where = f"{run.ckpt.directory} step {run.last_ckpt}" if run.last_ckpt is not None else "none saved yet"
            raise TrainingDiverged(f"step {s}: non-finite {', '.join(bad)}; last good checkpoint: {where}")
        return s, m

    def __call__(self, run: Run, metrics: dict[str, Any]) -> None:
        if self.pending is not None:
            s, m = self._drain(run)
            if s == run.start + 1:   # the first step includes compilation: rates start after it
                log.info("step %d/%d  loss %.4f  (first step, with compilation: %.1fs)", s, self.total, m["loss"],
                         time.time() - self.t0)
                self.t0, self.timed = time.time(), 0
                run.writer.write(s, {f"train/{k}": v for k, v in m.items()})
            elif s % self.every == 0 or time.time() - self.last_line >= self.seconds:
                self.last_line = time.time()
                sps = self.timed / max(time.time() - self.t0, 1e-9)
                extra = ""
                if "task_id" in m and run.task_names:
                    extra += f"  task {run.task_names[int(m['task_id'])]}"
                if "false_negatives" in m:
                    extra += f"  masked false negatives {m['false_negatives']:.2f}/query"
                log.info("step %d/%d  loss %.4f  acc %.3f  %.2f step/s  %.1f ex/s  ETA %s%s", s, self.total,
                         m["loss"], m.get("accuracy", float("nan")), sps, sps * self.batch,
                         fmt_duration((self.total - s) / sps) if sps > 0 else "?", extra)
                run.writer.write(s, {**{f"train/{k}": v for k, v in m.items()},
                                     "perf/examples_per_second": sps * self.batch})
            self.timed += 1
        self.pending = (run.step, metrics)

    def finish(self, run: Run) -> None:
        if self.pending is not None:
            s, m = self._drain(run)
            run.writer.write(s, {f"train/{k}": v for k, v in m.items()})
            run.results["last_train_metrics"] = m
            self.pending = None
            if self.timed > 1:   # steps after the first (compilation), up to the last one drained
                run.results.setdefault("timing", {})["examples_per_second"] = \
                    (self.timed - 1) * self.batch / max(time.time() - self.t0, 1e-9)


class StopWhenAsked(Action):
    """SIGTERM (preemption) or the caller's `stop_requested()`: stop at a step every process agrees on."""

    def __init__(self, stop_requested: Callable[[], bool] | None):
        self.preemption, self.stop_requested, self.reason = PreemptionWatcher(), stop_requested, ""

    def __call__(self, run: Run, metrics: dict[str, Any]) -> None:
        run.stop = self.preemption.reached(run.step) or bool(self.stop_requested and self.stop_requested())
        if run.stop:
            run.results["preempted"] = True
            self.reason = ("preempted (SIGTERM)" if self.preemption.requested or self.preemption._sync
                           else "stop requested")

    def finish(self, run: Run) -> None:
        self.preemption.close()


class EvaluateEvery(Action):
    """`eval.every_steps`: evaluate during training (not at the last step: the evaluation after does that)."""

    def __init__(self, every: int):
        self.every = every

    def __call__(self, run: Run, metrics: dict[str, Any]) -> None:
        if run.evaluator and self.every and run.step % self.every == 0 and run.step < run.config.num_steps \
                and not run.stop:
            run.eval_metrics = run.results.setdefault("during", {})[run.step] = run.evaluate("during")


class CheckpointEvery(Action):
    """Saves every `checkpoint_every_steps`, when stopping, and at each evaluation when the best checkpoints
    are kept (the metric ranks them)."""

    def __init__(self, config: ConfigDict, stop: StopWhenAsked):
        self.every, self.keep_best, self.stopper = config.checkpoint_every_steps, config.keep_best_checkpoints, stop

    def __call__(self, run: Run, metrics: dict[str, Any]) -> None:
        if (self.every and run.step % self.every == 0) or run.stop or \
                (run.eval_metrics is not None and self.keep_best):
            run.ckpt.save(run.step, run.state, run.data_state, metrics=run.eval_metrics)
            run.last_ckpt = run.step
        if run.stop:
            log.warning("%s: checkpoint of step %d saved; run the same command again to resume",
                        self.stopper.reason, run.step)


def train_loop(run: Run, step_fn: Callable, train_iter: Iterator, actions: list[Action]) -> None:
    """Steps until `num_steps` or a stop; every action sees every step."""
    from embedjax.data.pipeline import device_batch

    def iterator_state():
        return train_iter.get_state() if hasattr(train_iter, "get_state") else None

    run.data_state = iterator_state()
    # with one task per batch over several tasks, each step's task is logged (a host-side value)
    tasks = list(getattr(train_iter, "task_names", ()))
    per_task = len(tasks) > 1 and bool(run.config.data.get("one_task_per_batch", False))
    run.task_names = tasks
    for action in actions:
        action.begin(run)
    with jax.set_mesh(run.mesh):
        while run.step < run.config.num_steps and not run.stop:
            local = next(train_iter)
            batch = sharding.global_batch(device_batch(local), run.mesh)
            run.data_state = iterator_state()
            run.state, metrics = step_fn(run.state, batch)
            if per_task:
                metrics = {**metrics, "task_id": np.int32(local["task_id"][0])}
            run.step += 1
            run.eval_metrics = None
            for action in actions:
                action(run, metrics)
        for action in actions:
            action.finish(run)


# --------------------------------------------------------------------------------------------- main entry

def initial_state(exp: Any, ckpt: Any, source: Any, config: ConfigDict) -> tuple[Any, Any, Any, int]:
    """(state, state shardings, restored data-iterator state or None, start step): resume from the workdir's
    latest checkpoint, or start from another run's model weights, pretrained weights or a random init."""
    from embedjax.checkpoint import Checkpointer

    if ckpt.latest_step() is not None:
        # resume: build the state abstractly (nothing allocated, pretrained weights not needed) and restore
        # each shard straight onto its devices, whatever mesh wrote the checkpoint
        abstract, shards = exp.abstract_state(source.config)
        state, data_state, start = ckpt.restore(abstract)
        log.info("resuming from %s step %d", ckpt.directory, start)
        return state, shards, data_state, start
    pretrained = source.params
    if source.run is not None:   # another run's model weights (not its optimizer state), read onto this mesh
        from embedjax.config import read_workdir_config
        from embedjax.lora import from_config, init_adapters, merge

        abstract, _ = exp.abstract_state(source.config)
        target = {"model": abstract.params["model"]}
        run_lora = from_config(read_workdir_config(source.run[0]))
        if run_lora.enabled:   # that run trained adapters beside a frozen model: start from the merged model
            rep = sharding.replicated(exp.mesh)
            target["lora"] = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                                          jax.eval_shape(lambda r: init_adapters(run_lora, target["model"], r),
                                                         jax.random.key(0)))
        src = Checkpointer(source.run[0] / "checkpoints", read_only=True)
        try:
            restored, src_step = src.restore_subtree({"params": target}, source.run[1])
        finally:
            src.close()
        got = restored["params"]
        pretrained = merge(got["model"], got["lora"], run_lora.scale) if run_lora.enabled else got["model"]
        log.info("starting from %s step %d (model weights; fresh optimizer state, step 0)", source.run[0], src_step)
    elif config.init_from:
        log.info("starting from pretrained %s", config.init_from)
    else:
        log.info("starting from scratch (seed %d)", config.seed)
    state, shards = exp.create_state(source.config, jax.random.key(config.seed), pretrained=pretrained)
    return state, shards, None, 0


def _evaluation(config: ConfigDict, encoder: Any, writer: MetricWriter) -> Callable | None:
    """(tag, step, model params) -> metrics of every `eval.tasks` evaluator, logged and written; None when
    there are none."""
    from embedjax.evaluate import encode_fn_from_encoder

    evaluators = build_evaluators(config)
    if not evaluators:
        return None

    def evaluate(tag: str, step: int, params: Any) -> dict[str, float]:
        encoder.params = params
        encoder.__dict__.pop("fingerprint", None)
        out = {}
        for name, ev in evaluators.items():
            if hasattr(ev, "use_cache"):
                # the model before training is often a published checkpoint evaluated again and again: its
                # corpus embeddings are cached (keyed by a hash of the weights); later ones never repeat
                ev.use_cache = tag == "before" and jax.process_count() == 1
            t0 = time.time()
            m = ev.run(encode_fn_from_encoder(encoder, batch_size=config.eval.batch_size))
            out.update({f"{name}/{k}": float(v) for k, v in m.items() if isinstance(v, (int, float))})
            log.info("eval %s step %d %s: %s (%.0fs)", tag, step, name,
                     ", ".join(f"{k}={v:.4f}" for k, v in m.items() if isinstance(v, float)), time.time() - t0)
        writer.write(step, {f"eval/{k}": v for k, v in out.items()})
        return out
    evaluate.evaluators = evaluators   # type: ignore[attr-defined]
    return evaluate


def train_and_evaluate(config: ConfigDict, workdir: str | Path, *,
                       train_iter: Iterator[dict[str, np.ndarray]] | None = None,
                       stop_requested: Callable[[], bool] | None = None,
                       devices: Any = None) -> dict[str, Any]:
    """Trains per `config` in `workdir` (a local path or gs://); returns {"before": {...}, "after": {...},
    "final_step": n, "preempted": bool, ...}. SIGTERM, or `stop_requested()` returning True, checkpoints at
    the next step boundary and returns early (run again with the same workdir to resume). `devices`: the
    devices of the mesh (default: all)."""
    from embedjax.checkpoint import Checkpointer, as_path
    from embedjax.data.prompts import config_prompt
    from embedjax.encoder import Encoder
    from embedjax.experiment import assemble
    from embedjax.models.source import resolve

    # Everything that can reject the config runs before the workdir is touched: keys and named choices,
    # prompts, the mesh, the batch split, the objective and the optimizer.
    t_begin = time.time()
    workdir = as_path(str(workdir) if "://" in str(workdir) else Path(workdir).absolute())
    lead = jax.process_index() == 0
    mesh = sharding.make_mesh(dict(config.mesh), devices=devices)
    exp = assemble(config, mesh)
    if lead:
        workdir.mkdir(parents=True, exist_ok=True)   # on an object store: nothing (no folders there)
        try:
            (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
        except FileNotFoundError as e:
            if "://" not in str(workdir):
                raise
            from embedjax.errors import EmbedjaxError
            raise EmbedjaxError(f"workdir {workdir}: cannot write {workdir / 'config.json'}: not found (does "
                                f"the bucket exist?); the store said: {e}") from None
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())

    ckpt = Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints,
                        keep_best=config.keep_best_checkpoints, best_metric=config.best_metric,
                        best_mode=config.best_mode)
    source = resolve(config, weights=ckpt.latest_step() is None)
    if train_iter is None:
        from embedjax.quiet import captured_native_stderr
        with captured_native_stderr():   # TF's native notices while the input pipeline is built
            train_iter = build_train_iterator(config, source.tokenizer_dir, hf_tokenizer=source.tokenizer,
                                              workdir=workdir)
    state, shards, data_state, start = initial_state(exp, ckpt, source, config)
    if data_state is not None and hasattr(train_iter, "set_state"):
        train_iter.set_state(data_state)
    source.params = None   # the pretrained host copy is no longer needed

    encoder = Encoder(source.config, exp.model_params(state.params), source.tokenizer, name=str(workdir), mesh=mesh,
                      prompt=config_prompt(config.data))
    writer = MetricWriter(workdir)
    run = Run(config, mesh, workdir, ckpt, writer, _evaluation(config, encoder, writer), state, start, start,
              last_ckpt=start or None, model_params=exp.model_params)
    stopper = StopWhenAsked(stop_requested)
    actions = [LogMetrics(config), stopper, EvaluateEvery(config.eval.every_steps), CheckpointEvery(config, stopper)]
    timing = run.results.setdefault("timing", {})
    # the peak resident memory as each phase ends (the peak only grows: the first phase that raises it most is
    # what the job's memory is for)
    peaks = timing.setdefault("peak_rss_by_phase", {})
    peaks["start-up"] = peak_rss_bytes()
    try:
        if run.evaluator and config.eval.before and start == 0:
            t0 = time.time()
            run.results["before"] = run.evaluate("before")
            timing["eval_before_s"] = time.time() - t0
            peaks["evaluation before"] = peak_rss_bytes()
        t0 = time.time()
        train_loop(run, exp.train_step(source.config, shards), train_iter, actions)
        timing["train_s"] = time.time() - t0
        peaks["training"] = peak_rss_bytes()
        run.results["final_step"] = run.step
        after = None
        if run.step >= config.num_steps and run.evaluator:
            t0 = time.time()
            after = run.results["after"] = run.evaluate("after")
            timing["eval_after_s"] = time.time() - t0
            peaks["evaluation after"] = peak_rss_bytes()
        if run.last_ckpt != run.step:
            ckpt.save(run.step, run.state, run.data_state, metrics=after)
    except BaseException:
        # finish pending async saves (the last good checkpoint) before the error propagates; with several
        # processes the save's barriers may wait on a dead peer, so the wait is bounded
        _close_bounded(ckpt, None if jax.process_count() == 1 else 30.0)
        raise
    else:
        ckpt.close()
    finally:
        stopper.finish(run)
        writer.close()
    if run.step >= config.num_steps and config.export_final and lead:
        encoder.params = exp.model_params(run.state.params)
        if "://" in str(workdir):
            import tempfile
            with tempfile.TemporaryDirectory() as tmp:
                _copy_tree(encoder.save(Path(tmp) / "final"), workdir / "final")
        else:
            encoder.save(Path(str(workdir)) / "final")
        run.results["final_model"] = str(workdir / "final")
    timing["total_s"] = time.time() - t_begin
    timing["peak_rss_bytes"] = peak_rss_bytes()
    log.info("done in %s; peak resident memory %.2f GiB", fmt_duration(timing["total_s"]),
             timing["peak_rss_bytes"] / 2**30)
    if lead:
        _summarise(workdir, run.results)
        (workdir / "results.json").write_text(json.dumps(run.results, indent=2, default=str))
    run.results["state"] = run.state
    return run.results


def _summarise(workdir: Any, results: dict[str, Any]) -> None:
    """summary.png + summary.md into the workdir (through a local folder for gs://)."""
    from embedjax.summary import write_summary

    if "://" not in str(workdir):
        results["summary"] = [str(p) for p in write_summary(Path(str(workdir)), results)]
        return
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        if (workdir / "metrics.jsonl").exists():
            (Path(tmp) / "metrics.jsonl").write_bytes((workdir / "metrics.jsonl").read_bytes())
        local = write_summary(Path(tmp), results)
        for p in local:
            (workdir / p.name).write_bytes(p.read_bytes())
    results["summary"] = [str(workdir / p.name) for p in local]
