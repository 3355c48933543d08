"""The one way benchmarks here time a comparison: both sides warmed up first (compilation and first-call costs
reported on their own), then timed in interleaved rounds (A B, B A, A B, ...) so that a change in the machine's
load falls on both alike; the median and spread of each side, the ratio of medians, the 1-minute load average
before and after (for the record: it includes the benchmark's own work and decays over minutes, so it stays
high right after another benchmark), the share of the machine's CPU time that other processes used while it
ran (`other_cpu`, from /proc/stat less this process's and its children's CPU time; above `OTHER_CPU_LIMIT` the
run is flagged), and one JSON line per figure appended to `bench/results.jsonl` with the date, machine and
library versions.

    from _harness import compare
    res = compare("encode STS-B test", {"embedjax": run_a, "sentence-transformers": run_b},
                  work=2758, unit="sentences/s", rounds=5)

`measure` does the same for figures each side reports itself ({metric: value} per call: the peak RSS of a
subprocess, the seconds of one phase); a benchmark whose line carries a `row` ({embedjax, peers, check}) is printed
by bench/run_all.py in README's table of real peers.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

# EMBEDJAX_BENCH_RESULTS points trial runs elsewhere
RESULTS = Path(os.environ.get("EMBEDJAX_BENCH_RESULTS") or Path(__file__).resolve().parent / "results.jsonl")
LOAD_LIMIT = 0.25        # where /proc/stat cannot be read: a load average above this fraction of the cores flags
OTHER_CPU_LIMIT = 0.05   # other processes using more than this share of all cores' time flag the run: XLA's CPU
#                          threads wait for each other, so a few % taken from one core slows a step by far more


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def versions(*modules: str) -> dict[str, str]:
    """Versions of the modules: `__version__` of those already imported, else the installed distribution's
    (not imported here, so a parent that runs its sides in subprocesses stays small)."""
    import importlib.metadata as md
    import sys

    dists = md.packages_distributions()
    out = {}
    for m in ("jax", "jaxlib", "flax", "numpy", *modules):
        if m in sys.modules:
            out[m] = getattr(sys.modules[m], "__version__", "?")
            continue
        out[m] = "not installed"
        for d in dists.get(m, []):
            try:
                out[m] = md.version(d)
                break
            except md.PackageNotFoundError:
                pass
    return out


def load() -> float:
    return os.getloadavg()[0]


class CpuWatch:
    """The share of all cores' time that processes other than this one and its (waited-for) children used
    between construction and `other()`: the machine's busy time from /proc/stat (user, nice, system, irq,
    softirq, steal) less this process tree's user + system time. None where /proc/stat cannot be read."""

    def __init__(self) -> None:
        self.start = self._now()

    @staticmethod
    def _now() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        busy = (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")   # less idle and iowait
        t = os.times()
        return time.monotonic(), busy, t.user + t.system + t.children_user + t.children_system

    def other(self) -> float | None:
        end = self._now()
        if self.start is None or end is None:
            return None
        wall, busy, own = (b - a for a, b in zip(self.start, end))
        return max(0.0, (busy - own) / (wall * (os.cpu_count() or 1))) if wall > 0 else None


def _load_fields(load_before: float, watch: CpuWatch) -> dict[str, Any]:
    load_after = load()
    other = watch.other()
    cores = os.cpu_count() or 1
    flagged = max(load_before, load_after) > LOAD_LIMIT * cores if other is None else other > OTHER_CPU_LIMIT
    return {"load_before": round(load_before, 2), "load_after": round(load_after, 2),
            "other_cpu": None if other is None else round(other, 3), "under_load": flagged}


def load_text(res: dict[str, Any]) -> str:
    """'load 1.2 -> 1.9 on 2 cores, other processes 1.5% of the CPU' (+ the flag)."""
    other = res.get("other_cpu")
    text = (f"load {res['load_before']} -> {res['load_after']} on {res['machine']['cores']} cores, other processes "
            + ("unknown" if other is None else f"{100 * other:.1f}% of the CPU"))
    return text + ("; UNDER LOAD: not a fair figure" if res["under_load"] else "")


def compare(name: str, sides: dict[str, Callable[[], Any]], *, work: float, unit: str, rounds: int = 5,
            warmup: int = 1, meta: dict[str, Any] | None = None, modules: tuple[str, ...] = (),
            write: bool = True) -> dict[str, Any]:
    """Times each side's `fn()` (one unit of `work` per call, e.g. sentences) `rounds` times, interleaved, after
    `warmup` untimed calls each; returns and records {side: {median, min, max, spread, rate}, ratio, load...}."""
    load_before, watch = load(), CpuWatch()
    warm: dict[str, float] = {}
    for side, fn in sides.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            fn()
        warm[side] = time.perf_counter() - t0
    times: dict[str, list[float]] = {s: [] for s in sides}
    order = list(sides)
    for r in range(rounds):
        for side in (order if r % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            sides[side]()
            times[side].append(time.perf_counter() - t0)
    out: dict[str, Any] = {"benchmark": name, "date": _dt.datetime.now().isoformat(timespec="seconds"),
                           "unit": unit, "work_per_call": work, "rounds": rounds, "interleaved": True,
                           **_load_fields(load_before, watch), "machine": machine(), "versions": versions(*modules),
                           **(meta or {}), "sides": {}}
    for side, ts in times.items():
        med = statistics.median(ts)
        out["sides"][side] = {"rate": work / med, "median_s": med, "min_s": min(ts), "max_s": max(ts),
                              "spread": (max(ts) - min(ts)) / med, "warmup_s": warm[side]}
    names = list(sides)
    if len(names) == 2:
        a, b = names
        out["ratio"] = {"of": f"{a} / {b}", "value": out["sides"][a]["rate"] / out["sides"][b]["rate"]}
    if write:
        record(out)
    return out


def measure(name: str, sides: dict[str, Callable[[], dict[str, float]]], *, rounds: int = 5, warmup: int = 0,
            meta: dict[str, Any] | None = None, modules: tuple[str, ...] = (), write: bool = True
            ) -> dict[str, Any]:
    """Like `compare` for figures a side reports itself (peak memory of a subprocess, seconds of one phase, a
    rate): each side's `fn()` returns {metric: value}; after `warmup` discarded calls each, the sides run
    `rounds` times interleaved (A B C, C B A, ...); returns and records {side: {metric: {median, min, max,
    spread}}} with the load before and after."""
    load_before, watch = load(), CpuWatch()
    for side, fn in sides.items():
        for _ in range(warmup):
            fn()
    got: dict[str, list[dict[str, float]]] = {s: [] for s in sides}
    order = list(sides)
    for r in range(rounds):
        for side in (order if r % 2 == 0 else order[::-1]):
            got[side].append(sides[side]())
    out: dict[str, Any] = {"benchmark": name, "date": _dt.datetime.now().isoformat(timespec="seconds"),
                           "rounds": rounds, "interleaved": True, **_load_fields(load_before, watch),
                           "machine": machine(), "versions": versions(*modules), **(meta or {}), "sides": {}}
    for side, runs in got.items():
        out["sides"][side] = {}
        for metric in runs[0]:
            vals = [float(r[metric]) for r in runs]
            med = statistics.median(vals)
            out["sides"][side][metric] = {"median": med, "min": min(vals), "max": max(vals),
                                          "spread": (max(vals) - min(vals)) / abs(med) if med else 0.0}
    if write:
        record(out)
    return out


def record(res: dict[str, Any]) -> None:
    """Appends one result as a JSON line to bench/results.jsonl."""
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write(json.dumps(res) + "\n")


def combined_load(*results: dict[str, Any]) -> dict[str, Any]:
    """Load fields spanning several results taken one after the other (first before, last after, flagged if
    any was)."""
    others = [r.get("other_cpu") for r in results]
    return {"load_before": results[0]["load_before"], "load_after": results[-1]["load_after"],
            "other_cpu": None if None in others else max(others),
            "under_load": any(r["under_load"] for r in results)}


def report(res: dict[str, Any]) -> str:
    """Human-readable lines for one `compare` result."""
    lines = [f"{res['benchmark']} ({res['rounds']} interleaved rounds; {load_text(res)})"]
    for side, s in res["sides"].items():
        lines.append(f"  {side:<24} {s['rate']:9.2f} {res['unit']}  (median {s['median_s']:.3f} s, spread "
                     f"{100 * s['spread']:.0f}%, warm-up {s['warmup_s']:.1f} s)")
    if "ratio" in res:
        lines.append(f"  ratio {res['ratio']['of']}: {res['ratio']['value']:.2f}")
    return "\n".join(lines)


def report_measure(res: dict[str, Any]) -> str:
    """Human-readable lines for one `measure` result: each side's metrics as median [min - max]."""
    lines = [f"{res['benchmark']} ({res['rounds']} interleaved rounds; {load_text(res)})"]
    for side, metrics in res["sides"].items():
        cells = [f"{m} {v['median']:.4g} [{v['min']:.4g} - {v['max']:.4g}]" for m, v in metrics.items()]
        lines.append(f"  {side:<22} " + ", ".join(cells))
    return "\n".join(lines)
