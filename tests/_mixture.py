"""A small two-task training mixture from shipped SciFact, as sharded JSONL sources (tests of the streamed
data layer and of training on it)."""
from __future__ import annotations

import json
from pathlib import Path

from embedjax.data import records

GECKO = ("task: {task} | query: {text}", "title: {title} | text: {text}")
INSTR = {"fact": "Given a scientific claim, retrieve documents that support or refute it",
         "title": "Given a title, retrieve the paper"}


def scifact_rows(shipped: Path, n: int = 240) -> dict[str, list[dict]]:
    """Two tasks from shipped SciFact: claim -> abstract (with 2 negatives), title -> abstract."""
    corpus = [json.loads(l) for l in (shipped / "scifact" / "corpus.jsonl").open()][: n + 8]
    queries = [json.loads(l) for l in (shipped / "scifact" / "queries.jsonl").open()][:n]
    # every 8th claim is supported by the previous claim's abstract: the same positive in two examples
    # (on two hosts of one global batch, a false negative that only the loss's mask can remove)
    fact = [{"query": q["text"], "positive": {"title": corpus[i - (i % 8 == 7)]["title"],
                                              "text": corpus[i - (i % 8 == 7)]["text"][:300]},
             "negatives": [corpus[i + 1]["text"][:200], corpus[i + 2]["text"][:200]], "scores": [0.9, 0.2, 0.1]}
            for i, q in enumerate(queries)]
    title = [{"q": c["title"], "doc": c["text"][:300]} for c in corpus[:n // 2]]
    return {"fact": fact, "title": title}


def write_sources(root: Path, rows: dict[str, list[dict]], files_per_task: int = 4) -> list[dict]:
    srcs = []
    for task, rs in rows.items():
        d = root / task
        d.mkdir(parents=True)
        for k in range(files_per_task):
            records.write_jsonl(d / f"part-{k:03d}.jsonl", rs[k::files_per_task])
        src = {"name": task, "files": str(d / "part-*.jsonl"), "instruction": INSTR[task]}
        if task == "title":
            src["fields"] = {"query": "q", "positive": "doc"}
            src["rate"] = 0.5
        else:
            src["rate"] = 1.0
        srcs.append(src)
    return srcs
