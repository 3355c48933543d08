"""What a training run did, in a picture and a page: ``summary.png`` and ``summary.md`` in the workdir.

The picture has the training loss and in-batch accuracy per step, the throughput per logged step, and each
evaluation metric before / during / after training; the page has the result table, the timings and peak
memory, and links the picture. Both are rebuilt from ``metrics.jsonl`` and ``results.json`` alone
(`write_summary(workdir)`), so they can be made again for any finished or resumed run.
"""
from __future__ import annotations

import json
import logging
import resource
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# the metric a result table leads with, in order of preference (the first one the run evaluated)
PRIMARY = ("ndcg@10", "spearman", "map@100", "recall@100")


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _rows(workdir: Path) -> list[dict[str, Any]]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def eval_series(rows: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("eval/") and isinstance(v, (int, float)):
                out.setdefault(k[len("eval/"):], []).append((int(r["step"]), float(v)))
    return out


def primary_metrics(names: list[str]) -> list[str]:
    for suffix in PRIMARY:
        hit = [n for n in names if n.endswith("/" + suffix)]
        if hit:
            return hit
    return names[:1]


def result_table(before: dict[str, float], after: dict[str, float], names: list[str] | None = None) -> list[str]:
    """Lines of a before / after / change table (x100, as papers report retrieval and STS)."""
    names = names if names is not None else primary_metrics(sorted(after or before))
    width = max([len("metric")] + [len(n) for n in names])
    lines = [f"{'metric':<{width}}  {'before':>7}  {'after':>7}  {'change':>7}"]
    for n in names:
        b, a = before.get(n), after.get(n)
        fb = f"{100 * b:7.2f}" if b is not None else f"{'-':>7}"
        fa = f"{100 * a:7.2f}" if a is not None else f"{'-':>7}"
        ch = f"{100 * (a - b):+7.2f}" if a is not None and b is not None else f"{'-':>7}"
        lines.append(f"{n:<{width}}  {fb}  {fa}  {ch}")
    return lines


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    # matplotlib's object API, not pyplot: no global backend is switched (a notebook's inline plots keep working)
    from matplotlib.figure import Figure

    train = [r for r in rows if "train/loss" in r]
    evals = eval_series(rows)
    fig = Figure(figsize=(14, 3.8))
    axes = fig.subplots(1, 3)
    ax = axes[0]
    if train:
        steps = [r["step"] for r in train]
        ax.plot(steps, [r["train/loss"] for r in train], "-o", ms=3, color="tab:blue", label="loss")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss", color="tab:blue")
        acc = [(r["step"], r["train/accuracy"]) for r in train if "train/accuracy" in r]
        if acc:
            ax2 = ax.twinx()
            ax2.plot([s for s, _ in acc], [a for _, a in acc], "-s", ms=3, color="tab:orange")
            ax2.set_ylabel("in-batch accuracy", color="tab:orange")
            ax2.set_ylim(0, 1.02)
    ax.set_title("training")
    ax = axes[1]
    perf = [(r["step"], r["perf/examples_per_second"]) for r in rows if "perf/examples_per_second" in r]
    if perf:
        ax.plot([s for s, _ in perf], [v for _, v in perf], "-o", ms=3, color="tab:green")
    ax.set_xlabel("step")
    ax.set_ylabel("examples / s")
    ax.set_title("throughput")
    ax = axes[2]
    for name in primary_metrics(sorted(evals)):
        pts = evals[name]
        ax.plot([s for s, _ in pts], [100 * v for _, v in pts], "-o", label=name)
        for s, v in (pts[0], pts[-1]):
            ax.annotate(f"{100 * v:.2f}", (s, 100 * v), textcoords="offset points", xytext=(0, 6), ha="center")
    if evals:
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel("step")
    ax.set_ylabel("x 100")
    ax.set_title("evaluation")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def write_summary(workdir: str | Path, results: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Writes ``summary.png`` and ``summary.md`` into a local `workdir`; returns their paths."""
    workdir = Path(workdir)
    if results is None:
        results = json.loads((workdir / "results.json").read_text(encoding="utf-8"))
    rows = _rows(workdir)
    png = plot(rows, workdir / "summary.png", f"{workdir.name}: {results.get('final_step', '?')} steps")
    before, after = results.get("before", {}) or {}, results.get("after", {}) or {}
    timing = results.get("timing", {}) or {}
    lines = [f"# {workdir.name}", "", "![loss, accuracy, throughput and evaluation per step](summary.png)", ""]
    scores = sorted(n for n in set(before) | set(after) if not n.rsplit("/", 1)[-1].startswith("n_"))  # no counts
    if scores:
        lines += ["```", *result_table(before, after, scores), "```", ""]
    lines += ["| | |", "|---|---|", f"| steps | {results.get('final_step', '?')} |"]
    for key, label in (("eval_before_s", "evaluation before"), ("train_s", "training"),
                       ("eval_after_s", "evaluation after"), ("total_s", "total")):
        if key in timing:
            lines.append(f"| {label} | {timing[key]:.0f} s |")
    if "examples_per_second" in timing:
        lines.append(f"| throughput | {timing['examples_per_second']:.1f} examples/s |")
    if "peak_rss_bytes" in timing:
        by_phase = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in timing.get("peak_rss_by_phase", {}).items())
        lines.append(f"| peak resident memory | {timing['peak_rss_bytes'] / 2**30:.2f} GiB"
                     + (f" (peak as each phase ended, GiB: {by_phase})" if by_phase else "") + " |")
    if results.get("final_model"):
        lines.append(f"| final model | `{results['final_model']}` |")
    md = workdir / "summary.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return png, md
