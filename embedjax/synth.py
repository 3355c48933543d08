"""`embedjax synth --llm LLM --embedder MODEL --corpus CORPUS --output DIR`: synthetic retrieval training data
the Gecko / FRet way (Lee et al., 2024), with a decoder LLM in JAX (`embedjax.generate`) and an embedjax
embedder.

For each seed passage (the first `num_passages` of a permutation of the corpus drawn from `seed`):

1. the LLM, few-shot prompted (`examples`: (passage, task, query) triples, `EXAMPLES` unless given; the CLI reads
   them from a JSONL file of {"passage", "task", "query"} lines, `--examples`), writes a retrieval task for the
   passage, then a query for that task (two generations, each ending at a newline: Gecko's task-then-query
   order);
2. the embedder retrieves the corpus's top `top_k` passages for the query (cosine; the seed passage is added
   when it is not among them);
3. the LLM rescores every candidate two ways: query likelihood (QL, the mean log p(query | passage) per query
   token) and relevance classification (RC, P(yes) / (P(yes) + P(no)) to "does the passage answer the
   query?", `Generator.yes_probability`); the two rankings are fused by reciprocal rank fusion,
   1 / (rrf_k + rank_QL) + 1 / (rrf_k + rank_RC);
4. the best fused candidate is the positive (not always the seed passage: FRet's point), the `negatives` worst
   fused candidates (other than passages with the positive's text) the hard negatives.

Each result is one JSON line in the triplet format `embedjax.data.sources.read_pairs` reads, plus what made it:

    {"query", "query_id": "synth-{i}", "task", "seed_id", "positive": {"title", "text"}, "positive_id",
     "negatives": [{"title", "text"}, ...], "negative_ids", "scores": RC of [positive, negatives...],
     "query_likelihood": QL of the same, "retrieval_scores": cosine of the same,
     "candidates": {"ids", "retrieval", "ql", "rc", "fused"} (every candidate, in retrieval order)}

written to DIR/shard-00000.jsonl, shard-00001.jsonl, ... (`rows_per_shard` rows each). A passage whose task or
query comes out empty is skipped and counted.

How often the relabelling moved the positive: a row whose positive is its seed passage "kept" it, any other row
"changed" it. progress.json keeps both counts (with rows and skipped) for every passage done so far, and the run
ends with a summary of them over the whole folder, a resumed run included (`SynthStats.summary`). A progress bar
(or, off a terminal, log lines) counts passages with an ETA (`embedjax.progress`).

Resumable: the passages go in chunks of `chunk`; after a chunk's rows are written and flushed, DIR/progress.json
records the chunks done and every shard's size. A rerun with the same settings truncates what a crash left half
written and continues with the next chunk; the output is byte for byte that of an uninterrupted run (a chunk's
sampling seed depends on its index only, and the Generator's keys on the prompt's place in the chunk). Other
settings on an existing DIR are refused, naming the setting. The corpus embeddings are kept in
DIR/corpus_embeddings.npy.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

INSTRUCTION = ("Write a retrieval task that the passage below is useful for, then a search query for that task "
               "to which the passage is a relevant result.")
EXAMPLES: tuple[tuple[str, str, str], ...] = (
    ("The mitochondrion is the site of oxidative phosphorylation, where the electron transport chain produces "
     "most of the cell's ATP.",
     "Given a biology question, retrieve passages that answer it",
     "where in the cell is most ATP produced"),
    ("Aspirin irreversibly inhibits cyclooxygenase, which reduces the synthesis of thromboxane A2 in platelets "
     "for the rest of their lifespan.",
     "Given a claim about a drug, retrieve passages that support or refute it",
     "aspirin has a lasting effect on platelet function"),
)
QL_TEMPLATE = "Passage: {passage}\nA search query this passage answers:"
RC_TEMPLATE = ("Passage: {passage}\nQuery: {query}\nDoes the passage answer the query? Answer yes or no.\n"
               "Answer:")


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    num_passages: int = 1000          # seed passages (at most the corpus size)
    seed: int = 0
    chunk: int = 64                   # passages per unit of work (and of resumption)
    rows_per_shard: int = 10_000
    max_new_tokens: int = 64          # per generation (the task, then the query)
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 20                   # candidates retrieved per query
    negatives: int = 4
    rrf_k: int = 60
    yes: tuple[str, ...] = (" yes", " Yes")
    no: tuple[str, ...] = (" no", " No")
    max_passage_chars: int = 2000     # passages are cut to this many characters inside LLM prompts
    query_prompt: str | None = None   # the embedder's query / document prompts (e.g. "query: ")
    document_prompt: str | None = None
    batch_size: int = 32              # LLM rows per batch
    encode_batch_size: int = 128      # embedder batch
    examples: tuple[tuple[str, str, str], ...] = EXAMPLES   # few-shot (passage, task, query) triples

    def __post_init__(self) -> None:
        for name in ("num_passages", "chunk", "rows_per_shard", "max_new_tokens", "top_k", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.negatives < self.top_k:
            raise ValueError(f"negatives must be in [0, top_k={self.top_k}), got {self.negatives}")
        object.__setattr__(self, "yes", tuple([self.yes] if isinstance(self.yes, str) else self.yes))
        object.__setattr__(self, "no", tuple([self.no] if isinstance(self.no, str) else self.no))
        examples = tuple(tuple(e) for e in self.examples)
        for i, e in enumerate(examples):
            if len(e) != 3 or not all(isinstance(x, str) and x.strip() for x in e):
                raise ValueError(f"few-shot example {i} must be three non-empty strings (passage, task, query), "
                                 f"got {e!r}")
        object.__setattr__(self, "examples", examples)


@dataclasses.dataclass
class SynthStats:
    passages: int = 0     # seed passages processed (this run)
    rows: int = 0         # rows written (this run)
    skipped: int = 0      # passages whose task or query came out empty (this run)
    chunks: int = 0       # chunks done (this run)
    kept: int = 0         # rows whose positive is their seed passage (this run)
    changed: int = 0      # rows whose positive is another passage (this run)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    # the same over every passage done in the output folder so far (earlier runs included)
    total_passages: int = 0
    total_rows: int = 0
    total_skipped: int = 0
    total_kept: int = 0
    total_changed: int = 0

    def positives(self) -> str:
        """How often the positive changed, over every passage done in the folder so far."""
        def pct(k: int) -> str:
            return f"{100.0 * k / self.total_rows:.1f}%" if self.total_rows else "-"
        return (f"positives over all {self.total_passages} passages done ({self.total_rows} triplets, "
                f"{self.total_skipped} skipped): {self.total_kept} kept their seed passage "
                f"({pct(self.total_kept)}), {self.total_changed} got another passage ({pct(self.total_changed)})")

    def summary(self) -> str:
        secs = ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())
        return (f"{self.rows} triplets from {self.passages} passages in {self.chunks} chunks this run "
                f"({self.skipped} skipped: empty task or query; {self.kept} kept the seed passage as positive, "
                f"{self.changed} another){'; ' + secs if secs else ''}\n{self.positives()}")


def task_prompt(passage: str, examples: Sequence[tuple[str, str, str]] = EXAMPLES) -> str:
    shots = "".join(f"Passage: {p}\nTask: {t}\nQuery: {q}\n\n" for p, t, q in examples)
    return f"{INSTRUCTION}\n\n{shots}Passage: {passage}\nTask:"


def query_prompt(passage: str, task: str, examples: Sequence[tuple[str, str, str]] = EXAMPLES) -> str:
    return f"{task_prompt(passage, examples)} {task}\nQuery:"


def fuse(ql: np.ndarray, rc: np.ndarray, rrf_k: int) -> np.ndarray:
    """Reciprocal rank fusion of two score vectors (higher is better; rank 1 is the best; ties keep the
    earlier candidate, i.e. the better retrieved one, first)."""
    def ranks(x: np.ndarray) -> np.ndarray:
        r = np.empty(len(x), np.int64)
        r[np.argsort(-x, kind="stable")] = np.arange(1, len(x) + 1)
        return r
    return 1.0 / (rrf_k + ranks(ql)) + 1.0 / (rrf_k + ranks(rc))


class _Output:
    """Shards + progress.json of one output folder (see the module docstring)."""

    def __init__(self, folder: Path, settings: dict, rows_per_shard: int):
        self.folder, self.settings, self.rows_per_shard = folder, settings, rows_per_shard
        self.progress_path = folder / "progress.json"
        folder.mkdir(parents=True, exist_ok=True)
        shards_on_disk = sorted(p.name for p in folder.glob("shard-*.jsonl"))
        if self.progress_path.is_file():
            state = json.loads(self.progress_path.read_text(encoding="utf-8"))
            diff = sorted(k for k in set(settings) | set(state["settings"])
                          if settings.get(k) != state["settings"].get(k))
            if diff:
                k = diff[0]
                raise ValueError(f"{folder}: written with {k}={state['settings'].get(k)!r}, this run has "
                                 f"{k}={settings.get(k)!r}; resume with the same settings or use another --output")
            self.chunks_done, self.shards = int(state["chunks_done"]), [list(s) for s in state["shards"]]
            self.total_rows, self.total_skipped = int(state["rows"]), int(state["skipped"])
            known = {name for name, _, _ in self.shards}
            for name, size, _ in self.shards:   # cut what a crash left after the last recorded chunk
                path = folder / name
                if path.stat().st_size != size:
                    log.warning("%s: %d bytes after the last completed chunk; cut", path, path.stat().st_size - size)
                    os.truncate(path, size)
            for name in shards_on_disk:
                if name not in known:
                    (folder / name).unlink()
            if "seed_kept" in state:
                self.total_kept, self.total_changed = int(state["seed_kept"]), int(state["seed_changed"])
            else:   # a folder from before these counts: read them off the rows
                self.total_kept = self.total_changed = 0
                for name, _, _ in self.shards:
                    for line in (folder / name).read_text(encoding="utf-8").splitlines():
                        row = json.loads(line)
                        kept = row["positive_id"] == row["seed_id"]
                        self.total_kept += kept
                        self.total_changed += not kept
        else:
            if shards_on_disk:
                raise ValueError(f"{folder}: has shard files but no progress.json; use an empty folder")
            self.chunks_done, self.shards, self.total_rows, self.total_skipped = 0, [], 0, 0
            self.total_kept = self.total_changed = 0

    def append(self, rows: list[dict], skipped: int) -> None:
        """Writes one chunk's rows (a new shard every `rows_per_shard` rows), flushes them to disk, then records
        the chunk in progress.json (atomically: a temporary file renamed)."""
        rows = list(rows)
        kept = sum(r["positive_id"] == r["seed_id"] for r in rows)
        self.total_kept += kept
        self.total_changed += len(rows) - kept
        self.total_rows += len(rows)
        while rows:
            if not self.shards or self.shards[-1][2] >= self.rows_per_shard:
                self.shards.append([f"shard-{len(self.shards):05d}.jsonl", 0, 0])
            shard = self.shards[-1]
            part, rows = rows[:self.rows_per_shard - shard[2]], rows[self.rows_per_shard - shard[2]:]
            data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part).encode("utf-8")
            with open(self.folder / shard[0], "ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            shard[1] += len(data)
            shard[2] += len(part)
        self.chunks_done += 1
        self.total_skipped += skipped
        state = dict(settings=self.settings, chunks_done=self.chunks_done, shards=self.shards,
                     rows=self.total_rows, skipped=self.total_skipped, seed_kept=self.total_kept,
                     seed_changed=self.total_changed)
        tmp = self.progress_path.with_name("progress.json.tmp")
        tmp.write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        tmp.replace(self.progress_path)


def synthesize(generator: Any, encode_queries: Callable[[list[str]], np.ndarray],
               encode_documents: Callable[[list[str]], np.ndarray], corpus: dict[str, tuple[str, str]],
               output: str | os.PathLike, config: SynthConfig = SynthConfig(), *, settings: dict | None = None,
               max_chunks: int | None = None, show_progress: bool | None = None) -> SynthStats:
    """Runs (or resumes) the pipeline of the module docstring into `output`. `generator`: an
    `embedjax.generate.Generator`; `encode_*`: texts -> [N, D] embeddings (normalised here); `corpus`: id ->
    (title, text). `settings`: extra values that must agree on resumption (the CLI passes the model names).
    `max_chunks`: stop after that many chunks in this run (the rest on a later run). `show_progress`: the
    passages' progress bar / log lines (None: by the terminal, `embedjax.progress`)."""
    from embedjax.data.sources import doc_text
    from embedjax.progress import Progress

    cfg = config
    t_start = time.time()
    stats = SynthStats()
    ids = list(corpus)
    if not ids:
        raise ValueError("the corpus is empty")
    n = min(cfg.num_passages, len(ids))
    all_settings = dict(dataclasses.asdict(cfg), corpus_size=len(ids), **(settings or {}))
    all_settings = json.loads(json.dumps(all_settings))   # tuples -> lists, as progress.json holds them
    out = _Output(Path(output), all_settings, cfg.rows_per_shard)
    chunks = -(-n // cfg.chunk)

    def totals() -> SynthStats:
        stats.total_passages = min(n, out.chunks_done * cfg.chunk)
        stats.total_rows, stats.total_skipped = out.total_rows, out.total_skipped
        stats.total_kept, stats.total_changed = out.total_kept, out.total_changed
        return stats

    if out.chunks_done >= chunks:
        log.info("%s: all %d chunks already done", output, chunks)
        return totals()
    order = np.random.default_rng(cfg.seed).permutation(len(ids))[:n]
    texts = [doc_text(*corpus[i]) for i in ids]

    t0 = time.time()
    emb_path = Path(output) / "corpus_embeddings.npy"
    if emb_path.is_file() and out.chunks_done:
        docs = np.load(emb_path)
    else:
        docs = _normalize(np.asarray(encode_documents(texts), np.float32))
        np.save(emb_path, docs)
    if docs.shape[0] != len(ids):
        raise ValueError(f"{emb_path}: {docs.shape[0]} embeddings for a corpus of {len(ids)}")
    stats.seconds["embed corpus"] = time.time() - t0

    def cut(text: str) -> str:
        return text[:cfg.max_passage_chars]

    gen_kw = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, stop=["\n"],
                  batch_size=cfg.batch_size, show_progress=False)
    timing = {"generate": 0.0, "retrieve": 0.0, "rescore": 0.0}
    bar = Progress(n, "synth", "passage", show=show_progress, initial=min(n, out.chunks_done * cfg.chunk))
    with bar:
        for c in range(out.chunks_done, chunks):
            if max_chunks is not None and stats.chunks >= max_chunks:
                break
            positions = range(c * cfg.chunk, min(n, (c + 1) * cfg.chunk))
            seeds = [int(order[p]) for p in positions]
            passages = [cut(texts[s]) for s in seeds]
            chunk_seed = (cfg.seed * 1_000_003 + 2 * c) % 2 ** 32   # tasks; queries: + 1 (no two calls share one)
            t0 = time.time()
            tasks = [t.strip() for t in generator.generate([task_prompt(p, cfg.examples) for p in passages],
                                                           seed=chunk_seed, **gen_kw)]
            queries = [q.strip() for q in generator.generate(
                [query_prompt(p, t, cfg.examples) for p, t in zip(passages, tasks)],
                seed=(chunk_seed + 1) % 2 ** 32, **gen_kw)]
            timing["generate"] += time.time() - t0
            keep = [j for j in range(len(seeds)) if tasks[j] and queries[j]]

            t0 = time.time()
            cands = []
            if keep:
                q_emb = _normalize(np.asarray(encode_queries([queries[j] for j in keep]), np.float32))
                sims = q_emb @ docs.T
                for r, j in enumerate(keep):
                    top = np.argsort(-sims[r], kind="stable")[:cfg.top_k]
                    if seeds[j] not in top:
                        top = np.append(top, seeds[j])
                    cands.append((top, sims[r, top]))
            timing["retrieve"] += time.time() - t0

            t0 = time.time()
            pairs = [(j, int(d)) for (top, _), j in zip(cands, keep) for d in top]
            ql = generator.score_continuations([QL_TEMPLATE.format(passage=cut(texts[d])) for _, d in pairs],
                                               [" " + queries[j] for j, _ in pairs], batch_size=cfg.batch_size,
                                               show_progress=False).mean if pairs else np.zeros(0)
            rc = generator.yes_probability([RC_TEMPLATE.format(passage=cut(texts[d]), query=queries[j])
                                            for j, d in pairs], yes=cfg.yes, no=cfg.no, batch_size=cfg.batch_size,
                                           show_progress=False) if pairs else np.zeros(0)
            timing["rescore"] += time.time() - t0

            rows, at = [], 0
            for (top, sim), j in zip(cands, keep):
                k = len(top)
                q_s, r_s = np.asarray(ql[at:at + k], np.float64), np.asarray(rc[at:at + k], np.float64)
                at += k
                fused = fuse(q_s, r_s, cfg.rrf_k)
                ranked = np.argsort(-fused, kind="stable")
                pos = int(ranked[0])
                pos_text = texts[top[pos]]
                negs = [int(i) for i in ranked[1:][::-1] if texts[top[i]] != pos_text][:cfg.negatives]
                chosen = [pos] + negs

                def doc(i: int) -> dict:
                    title, text = corpus[ids[top[i]]]
                    return {"title": title, "text": text}
                rows.append({
                    "query": queries[j], "query_id": f"synth-{positions[j]}", "task": tasks[j],
                    "seed_id": ids[seeds[j]], "positive": doc(pos), "positive_id": ids[top[pos]],
                    "negatives": [doc(i) for i in negs], "negative_ids": [ids[top[i]] for i in negs],
                    "scores": [float(r_s[i]) for i in chosen],
                    "query_likelihood": [float(q_s[i]) for i in chosen],
                    "retrieval_scores": [float(sim[i]) for i in chosen],
                    "candidates": {"ids": [ids[d] for d in top], "retrieval": [float(x) for x in sim],
                                   "ql": [float(x) for x in q_s], "rc": [float(x) for x in r_s],
                                   "fused": [float(x) for x in fused]}})
            out.append(rows, skipped=len(seeds) - len(keep))
            kept = sum(r["positive_id"] == r["seed_id"] for r in rows)
            stats.passages += len(seeds)
            stats.rows += len(rows)
            stats.skipped += len(seeds) - len(keep)
            stats.kept += kept
            stats.changed += len(rows) - kept
            stats.chunks += 1
            bar.update(len(seeds))
            log.info("synth: chunk %d / %d done, %d rows so far (%d skipped, %d positives kept the seed)", c + 1,
                      chunks, out.total_rows, out.total_skipped, out.total_kept)
    stats.seconds.update(timing)
    stats.seconds["total"] = time.time() - t_start
    return totals()


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------------------------- command line

def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    d = SynthConfig()
    p = subparsers.add_parser(
        "synth", help="synthetic retrieval triplets from a corpus with an LLM (Gecko / FRet), resumable",
        description="For seed passages of a corpus: the LLM writes a task and a query; the embedder retrieves "
                    "candidates; the LLM rescores them (query likelihood + yes/no relevance, fused by rank); "
                    "the best is the positive, the worst the hard negatives. Writes triplets JSONL shards "
                    "(embedjax.data.sources.read_pairs format) to --output; rerun the same command to resume.")
    p.add_argument("--llm", required=True, help="Qwen3 / Gemma 3 text *ForCausalLM folder or hub id")
    p.add_argument("--embedder", required=True, help="embedding model folder or hub id (embedjax.Encoder)")
    p.add_argument("--corpus", required=True, help="BEIR corpus.jsonl (or a BEIR folder holding one)")
    p.add_argument("--output", required=True, help="output folder (shards + progress.json)")
    p.add_argument("--passages", type=int, default=d.num_passages, help=f"seed passages (default {d.num_passages})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--chunk", type=int, default=d.chunk, help="passages per resumable unit")
    p.add_argument("--rows-per-shard", type=int, default=d.rows_per_shard)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--top-k", type=int, default=d.top_k, help="candidates retrieved per query")
    p.add_argument("--negatives", type=int, default=d.negatives)
    p.add_argument("--yes", action="append", default=None,
                   help="a 'yes' answer token (repeatable; default ' yes' and ' Yes'): each one token")
    p.add_argument("--no", action="append", default=None, help="a 'no' answer token (repeatable)")
    p.add_argument("--examples", default=None,
                   help="few-shot examples: a JSONL file of {\"passage\", \"task\", \"query\"} lines (default: two "
                        "built-in biomedical examples)")
    p.add_argument("--max-passage-chars", type=int, default=d.max_passage_chars)
    p.add_argument("--max-prompt-length", type=int, default=1024, help="LLM prompt limit in tokens")
    p.add_argument("--query-prompt", default=None, help="the embedder's query prompt, e.g. 'query: '")
    p.add_argument("--document-prompt", default=None, help="the embedder's document prompt")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="LLM rows per batch")
    p.add_argument("--max-chunks", type=int, default=None, help="stop after this many chunks (resume later)")
    p.set_defaults(func=run)
    return p


def read_examples(path: str | os.PathLike) -> tuple[tuple[str, str, str], ...]:
    """Few-shot examples from a JSONL file: one {"passage", "task", "query"} object per line."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = [k for k in ("passage", "task", "query") if not str(row.get(k) or "").strip()]
        if missing:
            raise ValueError(f"{path}:{n}: a few-shot example needs non-empty passage, task and query; "
                             f"{', '.join(missing)} missing")
        out.append((row["passage"], row["task"], row["query"]))
    if not out:
        raise ValueError(f"{path}: no few-shot examples")
    return tuple(out)


def run(args: argparse.Namespace) -> int:
    import jax

    from embedjax.data.sources import read_beir_corpus
    from embedjax.encoder import Encoder
    from embedjax.generate import Generator
    from embedjax.models.convert import load_lm
    from embedjax.sharding import make_mesh

    corpus_path = Path(args.corpus)
    if corpus_path.is_dir():
        corpus_path = corpus_path / "corpus.jsonl"
    corpus = read_beir_corpus(corpus_path)
    cfg = SynthConfig(num_passages=args.passages, seed=args.seed, chunk=args.chunk,
                      rows_per_shard=args.rows_per_shard, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, negatives=args.negatives,
                      yes=tuple(args.yes or SynthConfig.yes), no=tuple(args.no or SynthConfig.no),
                      max_passage_chars=args.max_passage_chars, query_prompt=args.query_prompt,
                      document_prompt=args.document_prompt, batch_size=args.batch_size,
                      examples=read_examples(args.examples) if args.examples else EXAMPLES)
    t0 = time.time()
    llm_cfg, params, tok = load_lm(args.llm, lazy=True)
    mesh = make_mesh({"data": -1}) if jax.device_count() > 1 else None
    gen = Generator(llm_cfg, params, tok, mesh=mesh, max_prompt_length=args.max_prompt_length)
    enc = Encoder.load(args.embedder)
    log.info("loaded the LLM and %r in %.1fs", enc, time.time() - t0)

    def encode(texts: list[str], tower: str, prompt: str | None) -> np.ndarray:
        return enc.encode(texts, batch_size=cfg.encode_batch_size, prompt=prompt, normalize=True, tower=tower,
                          show_progress=len(texts) > 256)

    stats = synthesize(gen, lambda t: encode(t, "query", cfg.query_prompt),
                       lambda t: encode(t, "document", cfg.document_prompt), corpus, args.output, cfg,
                       settings={"llm": str(args.llm), "embedder": str(args.embedder),
                                 "corpus": str(corpus_path.resolve())},
                       max_chunks=args.max_chunks)
    print(f"synth {args.output}: {stats.summary()}", flush=True)
    return 0
