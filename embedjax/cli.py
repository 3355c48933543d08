"""`embedjax` command line: the only place that parses flags.

Subcommands: encode, train, eval, mine, export, aot, synth. Heavy imports happen inside each
subcommand so `embedjax --help` is instant.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import threading
import time
from pathlib import Path

from embedjax import errors

log = logging.getLogger("embedjax")

# Subcommands living in other modules: name -> module exposing add_parser(subparsers) and run(args).
_EXTERNAL = {
    "eval": "embedjax.evaluate.cli",
    "mine": "embedjax.mine",
    "export": "embedjax.export.cli",
    "aot": "embedjax.aot",
    "synth": "embedjax.synth",
    "prepare": "embedjax.data.inputs",
}


CLIError = errors.CLIError   # defined in embedjax/errors.py (one module of error types)


def _enable_compilation_cache() -> None:
    """Persistent XLA cache so repeated CLI runs skip compilation (EMBEDJAX_COMPILATION_CACHE=0 disables)."""
    import os

    d = os.environ.get("EMBEDJAX_COMPILATION_CACHE", str(Path.home() / ".cache" / "embedjax" / "xla"))
    if d in ("", "0"):
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", d)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _add_encode(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encode", help="embed a .txt (one text a line) or .jsonl (a 'text' field) file to .npy",
                       description="Embed texts with a sentence-transformers / Hugging Face model folder or hub id.")
    p.add_argument("--model", required=True, help="model folder (sentence-transformers or Hugging Face) or hub id")
    p.add_argument("--input", required=True, help=".txt (one text per line) or .jsonl (field --field)")
    p.add_argument("--output", required=True, help="output .npy file: float32 [N, D] (int8 / uint8 [N, D]; "
                   "binary / ubinary [N, ceil(D / 8)] packed bits with --precision)")
    p.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-length", type=int, default=None, help="token limit (default: the model's)")
    p.add_argument("--prompt", default=None, help="string prepended to every text, e.g. 'query: '")
    p.add_argument("--dim", type=int, default=None, help="keep the first DIM dimensions (Matryoshka)")
    p.add_argument("--layers", type=int, default=None,
                   help="run only the first LAYERS encoder layers (2D Matryoshka sub-network)")
    p.add_argument("--tower", choices=("query", "document"), default="query")
    p.add_argument("--no-normalize", action="store_true", help="return unnormalised embeddings")
    p.add_argument("--precision", choices=("float32", "int8", "uint8", "binary", "ubinary"), default="float32",
                   help="quantised output (embedjax.quantize; the codes of sentence-transformers' "
                        "quantize_embeddings); int8 / uint8 use the model's calibration ranges or --calibrate")
    p.add_argument("--calibrate", default=None, metavar="FILE",
                   help="texts (.txt / .jsonl, as --input) whose embeddings give the int8 / uint8 ranges, e.g. "
                        "a few thousand documents of the corpus")
    p.set_defaults(func=_run_encode)


def _run_encode(args: argparse.Namespace) -> int:
    import numpy as np

    from embedjax.encoder import Encoder, read_texts

    out = Path(args.output)
    if out.suffix != ".npy":
        raise CLIError(f"--output {out}: expected a .npy file")
    texts = read_texts(args.input, field=args.field)
    t0 = time.time()
    enc = Encoder.load(args.model)
    logging.info("loaded %r in %.1fs", enc, time.time() - t0)
    if args.layers is not None:
        try:
            enc = enc.truncated(args.layers)
        except ValueError as e:
            raise CLIError(f"--layers {args.layers}: {e}") from None
    kw = dict(batch_size=args.batch_size, max_length=args.max_length, prompt=args.prompt,
              normalize=False if args.no_normalize else None)
    if args.calibrate:
        if args.precision not in ("int8", "uint8"):
            raise CLIError(f"--calibrate gives int8 / uint8 ranges; --precision is {args.precision}")
        enc.calibrate(read_texts(args.calibrate, field=args.field), dims=[args.dim or enc.dim], tower=args.tower,
                      **kw)
    t0 = time.time()
    try:
        emb = enc.encode(texts, dim=args.dim, tower=args.tower, show_progress=len(texts) > 256,
                         precision=args.precision, **kw)
    except ValueError as e:
        if "needs calibration ranges" in str(e):
            raise CLIError(f"--precision {args.precision}: {args.model} has no calibration ranges for dim "
                           f"{args.dim or enc.dim}; pass --calibrate FILE (sample texts)") from None
        raise
    dt = time.time() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npy")
    np.save(tmp, emb)
    tmp.replace(out)  # never leave a half-written output behind
    buckets = sorted({s[1] for s in enc._compiled})
    print(f"encoded {len(texts)} texts -> {out} {tuple(emb.shape)} in {dt:.1f}s "
          f"({len(texts) / max(dt, 1e-9):.0f} texts/s); {enc.num_compilations} compilations "
          f"(length buckets used: {buckets})")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train / fine-tune from a config file",
                       description="Train per a Python config (configs/*.py), with dotted overrides, e.g. "
                                   "--config.optim.lr=3e-5 --config.batch_size=64. SIGTERM (TPU preemption) "
                                   "checkpoints at the next step and exits 0; the same command resumes.")
    p.add_argument("--config", required=True, help="configs/NAME.py[:variant]")
    p.add_argument("--workdir", required=True,
                   help="local folder or gs:// path: checkpoints/, metrics.jsonl, tensorboard/, final/")
    p.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                   help="call jax.distributed.initialize(): auto = when a cluster is detected (Cloud TPU VM, "
                        "GKE TPU, SLURM, Open MPI) or --coordinator is given")
    p.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-host, non-TPU clusters)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--heartbeat-timeout", type=int, default=60,
                   help="seconds without a heartbeat after which a process counts as lost and the others stop")
    p.add_argument("--fake-devices", type=int, default=None,
                   help="simulate N devices on the CPU (sets XLA_FLAGS before JAX starts)")
    p.set_defaults(func=_run_train)


def cluster_detected(environ: dict | None = None) -> bool:
    """Whether this process runs in a multi-process launch that jax.distributed.initialize() detects by itself:
    a Cloud TPU VM (the metadata server names the workers), GKE TPU, SLURM or Open MPI."""
    import os

    env = os.environ if environ is None else environ
    # libtpu, probed without a TPU, leaves placeholders such as TPU_WORKER_HOSTNAMES="WARNING: could not
    # determine ..." in the environment of the process (and its children): not a cluster
    env = {k: v for k, v in env.items() if not str(v).startswith("WARNING")}
    if any(env.get(k) for k in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS",
                                "JAX_COORDINATOR_ADDRESS")):
        return True
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    if environ is None and not env.get("TPU_SKIP_MDS_QUERY"):
        try:
            from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm
        except ImportError:
            return False
        return bool(running_in_cloud_tpu_vm)
    return False


def _init_distributed(args: argparse.Namespace) -> None:
    import os

    if args.fake_devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.fake_devices}").strip()
    import jax

    if args.distributed == "off":
        return
    if args.coordinator:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id, heartbeat_timeout_seconds=args.heartbeat_timeout)
    elif args.distributed == "on" or cluster_detected():
        jax.distributed.initialize(heartbeat_timeout_seconds=args.heartbeat_timeout)
    else:
        return
    if jax.process_index() != 0:   # one log for the run; other processes still show warnings and errors
        logging.getLogger().setLevel(logging.WARNING)
    start_liveness_watch(args.heartbeat_timeout)
    log.info("jax.distributed: %d processes, %d devices (%d local)", jax.process_count(), jax.device_count(),
             jax.local_device_count())


LIVENESS_PERIOD_S = 1.0
_LIVENESS_DONE = threading.Event()


def liveness_done() -> None:
    """This process finished its work: the others stop watching it (see `start_liveness_watch`)."""
    import jax
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None or jax.process_count() == 1 or _LIVENESS_DONE.is_set():
        return
    _LIVENESS_DONE.set()
    try:
        client.key_value_set(f"embedjax/alive/{jax.process_index()}", "done", allow_overwrite=True)
    except Exception:  # noqa: BLE001 - the service is gone already
        pass


def start_liveness_watch(heartbeat_timeout: float) -> None:
    """Each process writes a timestamp to the coordination service's key-value store every second and reads the
    others'; one that has not written for a third of the heartbeat timeout (at least 3 s) is lost: this process
    prints one line naming it and exits (status 3), before JAX's own heartbeat check aborts with its generic
    message (which would leave no report of which process went, and a hung collective behind). A process that
    finished its work writes "done" (`liveness_done`) and is never counted as lost."""

    import jax
    from jax._src import distributed

    client = distributed.global_state.client
    n, me = jax.process_count(), jax.process_index()
    if client is None or n == 1:
        return
    stale_after = max(3.0, heartbeat_timeout / 3.0)

    def watch() -> None:
        seen: dict[int, tuple[str, float]] = {}
        beat = 0
        while not _LIVENESS_DONE.is_set():
            beat += 1
            try:
                client.key_value_set(f"embedjax/alive/{me}", str(beat), allow_overwrite=True)
                now = time.monotonic()
                lost = []
                for p in range(n):
                    if p == me:
                        continue
                    try:
                        v = client.key_value_try_get(f"embedjax/alive/{p}")
                    except Exception:  # noqa: BLE001 - not written yet (still starting)
                        continue
                    if v == "done":
                        continue
                    if p not in seen or seen[p][0] != v:
                        seen[p] = (v, now)
                    elif now - seen[p][1] > stale_after:
                        lost.append(p)
                if lost:
                    print(f"embedjax train: process {me} stops: lost process(es) {lost} of {n} (no liveness "
                          f"signal for {stale_after:.0f} s)", file=sys.stderr, flush=True)
                    os._exit(3)
            except Exception:  # noqa: BLE001 - the service itself is gone (process 0 died): JAX reports it
                return
            time.sleep(LIVENESS_PERIOD_S)

    threading.Thread(target=watch, daemon=True, name="embedjax-liveness").start()


def lost_processes(timeout: float) -> list[int] | None:
    """Processes the coordination service no longer hears from (None when it cannot tell within `timeout`)."""
    import threading

    import jax
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None or jax.process_count() == 1:
        return None
    live: dict = {}

    def ask() -> None:
        try:
            live.update(client.get_live_nodes(list(range(jax.process_count()))))
        except Exception:  # noqa: BLE001 - best effort diagnosis
            pass
    t = threading.Thread(target=ask, daemon=True)
    t.start()
    t.join(timeout)
    return sorted(set(range(jax.process_count())) - set(live)) if live else None


def _run_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from embedjax.config import load_config

    cfg = load_config(args.config, overrides)
    _init_distributed(args)
    import jax

    from embedjax.trainer import TrainingDiverged, train_and_evaluate

    try:
        res = train_and_evaluate(cfg, args.workdir)
        liveness_done()
    except (TrainingDiverged, CLIError, FileNotFoundError, ValueError, TypeError, KeyboardInterrupt):
        liveness_done()
        raise
    except Exception as e:
        if jax.process_count() == 1:
            raise
        # a collective failed: most likely another process died. Name it (the coordination service notices
        # within the heartbeat timeout) and exit now instead of waiting in shutdown barriers.
        lost = lost_processes(args.heartbeat_timeout + 15)
        who = (f"lost process(es) {lost} of {jax.process_count()}" if lost else
               "no process reported lost; see the other processes' logs")
        print(f"embedjax train: process {jax.process_index()} stops: {who}; "
              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(3)
    if res.get("preempted"):
        print(f"preempted at step {res['final_step']}: checkpoint saved in {args.workdir}; "
              "run the same command again to resume", flush=True)
        return 0
    from embedjax.summary import result_table

    before, after = res.get("before", {}), res.get("after", {})
    if before or after:
        print("\n".join(result_table(before, after)))
    timing = res.get("timing", {})
    print(f"trained to step {res['final_step']} in {timing.get('total_s', 0) / 60:.1f} min "
          f"(peak memory {timing.get('peak_rss_bytes', 0) / 2**30:.1f} GiB); workdir {args.workdir}")
    for path in res.get("summary", []):
        print(f"  {path}")
    if res.get("final_model"):
        print(f"  {res['final_model']} (sentence-transformers folder)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedjax", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_encode(sub)
    _add_train(sub)
    for name, modname in _EXTERNAL.items():
        try:
            mod = importlib.import_module(modname)
        except ImportError as e:
            missing = getattr(e, "name", None) or str(e)
            p = sub.add_parser(name, help=f"(unavailable: {missing} is not installed)")
            p.set_defaults(func=_unavailable(name, missing))
            continue
        mod.add_parser(sub)
    return parser


def _unavailable(name: str, missing: str):
    def run(args: argparse.Namespace) -> int:
        raise CLIError(f"'embedjax {name}' needs {missing}; install the matching extra (pip install 'embedjax[data]')")
    return run


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if a.startswith("--config.")]
    unknown = [a for a in extra if not a.startswith("--config.")]
    if unknown or (overrides and args.command not in ("train", "prepare")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    args.config_overrides = overrides
    from embedjax import quiet

    if args.verbose:
        quiet.loud()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("jax._src", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        _enable_compilation_cache()
        if args.command == "train":
            return int(args.func(args, overrides) or 0)
        return int(args.func(args) or 0)
    except (errors.EmbedjaxError, FileNotFoundError, ValueError, TypeError) as e:
        if args.verbose:
            raise
        print(f"embedjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"embedjax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
