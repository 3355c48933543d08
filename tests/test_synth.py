"""`embedjax synth` (Gecko / FRet synthetic triplets) on a tiny random Gemma 3 LLM (tests/_llm.py), which also
serves as the embedder (last-token pooling), over 40 SciFact documents:

- every row is what its recorded pieces say: the task is the chunk's sampled generation, the candidates the
  embedder's top-k (+ the seed passage), QL / RC the Generator's scores, the positive the best fused candidate,
  the negatives the worst; the shards read back with `read_pairs`; rows + skipped = passages;
- a run stopped after one chunk, with a half-written line and a stray shard left behind (a crash), resumes to
  byte-identical shards and progress; other settings on the folder are refused;
- the CLI (`embedjax synth`, the Generator data-parallel over the 8 fake devices) writes the same triplets;
- end to end, as a user runs it (one device per process): `embedjax synth` on 200 SciFact passages with the tiny
  LLM and the real all-MiniLM-L6-v2, killed with SIGKILL once its first chunk is recorded, then resumed, writes
  the bytes of an uninterrupted run beside it; rows are well-formed, none twice, none missing; the LLM's scores of
  every candidate recomputed with transformers' PyTorch model agree, and by them the positive is the best fused
  candidate and the negatives the worst; the resumed run's summary of kept / changed positives covers all 200
  passages and its progress lines (with ETA) count from the chunks done before the kill."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _llm  # noqa: E402

KW = dict(num_passages=10, chunk=4, rows_per_shard=3, max_new_tokens=6, temperature=1.0, top_p=1.0, top_k=4,
          negatives=2, yes=(" is",), no=(" not",), max_passage_chars=200, batch_size=8)


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory) -> Path:
    return _llm.write_checkpoint("gemma3", tmp_path_factory.mktemp("synth_llm") / "llm")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, llm_dir):
    from embedjax.data.sources import read_beir_corpus, shipped_path
    from embedjax.encoder import Encoder
    from embedjax.generate import Generator
    from embedjax.models.convert import load_lm

    root = tmp_path_factory.mktemp("synth")
    llm = llm_dir
    full = read_beir_corpus(shipped_path("scifact") / "corpus.jsonl")
    corpus = dict(list(full.items())[:40])
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "title": t, "text": x}) + "\n"
                                               for k, (t, x) in corpus.items()))
    cfg, params, tok = load_lm(llm)
    gen = Generator(cfg, params, tok, max_prompt_length=512)
    enc = Encoder.load(llm)

    def encode(texts):
        return enc.encode(texts, batch_size=16, normalize=True, show_progress=False)
    return root, llm, corpus, gen, encode


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.jsonl")) + [folder / "progress.json"]}


def test_rows_are_what_their_pieces_say_and_resume_is_exact(setup, tmp_path):
    from embedjax.data.sources import doc_text, read_pairs
    from embedjax.synth import QL_TEMPLATE, RC_TEMPLATE, SynthConfig, fuse, synthesize, task_prompt

    root, _, corpus, gen, encode = setup
    cfg = SynthConfig(**KW)
    full = synthesize(gen, encode, encode, corpus, tmp_path / "a", cfg)
    assert full.chunks == 3 and full.passages == 10 and full.rows + full.skipped == 10 and full.rows >= 5
    rows = [json.loads(line) for p in sorted((tmp_path / "a").glob("shard-*.jsonl"))
            for line in p.read_text().splitlines()]
    # how often the positive changed: counted per run, and over the whole folder in progress.json
    kept = sum(r["positive_id"] == r["seed_id"] for r in rows)
    assert (full.kept, full.changed) == (kept, full.rows - kept)
    assert (full.total_passages, full.total_rows, full.total_kept, full.total_changed) == (10, full.rows, kept,
                                                                                          full.rows - kept)
    state = json.loads((tmp_path / "a" / "progress.json").read_text())
    assert (state["rows"], state["skipped"], state["seed_kept"], state["seed_changed"]) == (
        full.rows, full.skipped, kept, full.rows - kept)
    assert f"{kept} kept their seed passage" in full.summary()
    sizes = [len(p.read_text().splitlines()) for p in sorted((tmp_path / "a").glob("shard-*.jsonl"))]
    assert sizes == [3] * (full.rows // 3) + ([full.rows % 3] if full.rows % 3 else [])
    assert sum(read_pairs(p)[1].examples for p in (tmp_path / "a").glob("shard-*.jsonl")) == full.rows

    ids = list(corpus)
    texts = [doc_text(*corpus[i]) for i in ids]
    docs = encode(texts)
    order = np.random.default_rng(0).permutation(len(ids))[:10]
    # the first chunk's tasks are the sampled generations of its seed passages (chunk seed 0)
    first = [texts[i][:200] for i in order[:4]]
    tasks = [t.strip() for t in gen.generate([task_prompt(p) for p in first], max_new_tokens=6, temperature=1.0,
                                             stop=["\n"], seed=0, batch_size=8)]
    for r in rows:
        i = int(r["query_id"].split("-")[1])
        assert r["seed_id"] == ids[order[i]] and r["task"] and r["query"]
        if i < 4:
            assert r["task"] == tasks[i]
        c = r["candidates"]
        q = encode([r["query"]])[0]
        top = [ids[j] for j in np.argsort(-(docs @ q), kind="stable")[:4]]
        assert c["ids"][:4] == top and (len(c["ids"]) == 4 or c["ids"][4] == r["seed_id"])
        assert np.allclose(c["retrieval"][:4], np.sort(docs @ q)[::-1][:4], atol=1e-5)
        fused = fuse(np.asarray(c["ql"]), np.asarray(c["rc"]), 60)
        np.testing.assert_allclose(c["fused"], fused)
        ranked = np.argsort(-fused, kind="stable")
        assert r["positive_id"] == c["ids"][ranked[0]]
        assert r["negative_ids"] == [c["ids"][j] for j in ranked[::-1][:2]]
        assert r["scores"] == [c["rc"][c["ids"].index(d)] for d in [r["positive_id"]] + r["negative_ids"]]
    # QL and RC of one row's candidates, recomputed with the Generator
    r = rows[0]
    cand_texts = [texts[ids.index(d)][:200] for d in r["candidates"]["ids"]]
    ql = gen.score_continuations([QL_TEMPLATE.format(passage=p) for p in cand_texts],
                                 [" " + r["query"]] * len(cand_texts)).mean
    rc = gen.yes_probability([RC_TEMPLATE.format(passage=p, query=r["query"]) for p in cand_texts],
                             yes=[" is"], no=[" not"])
    np.testing.assert_allclose(r["candidates"]["ql"], ql, atol=1e-5)
    np.testing.assert_allclose(r["candidates"]["rc"], rc, atol=1e-6)

    # stopped after one chunk, then a crash leaves half a line and a shard progress.json does not know
    part = synthesize(gen, encode, encode, corpus, tmp_path / "b", cfg, max_chunks=1)
    assert part.chunks == 1 and json.loads((tmp_path / "b" / "progress.json").read_text())["chunks_done"] == 1
    last = sorted((tmp_path / "b").glob("shard-*.jsonl"))[-1]
    with open(last, "a") as f:
        f.write('{"query": "half a li')
    (tmp_path / "b" / "shard-00009.jsonl").write_text("stray\n")
    rest = synthesize(gen, encode, encode, corpus, tmp_path / "b", cfg)
    assert rest.chunks == 2 and part.rows + rest.rows == full.rows
    assert _files(tmp_path / "b") == _files(tmp_path / "a")
    # the resumed run's summary covers every passage of the folder, the first run's included
    assert part.kept + rest.kept == kept and (rest.total_passages, rest.total_kept) == (10, kept)
    assert f"positives over all 10 passages done ({full.rows} triplets, {full.skipped} skipped): {kept} kept" \
        in rest.summary()
    again = synthesize(gen, encode, encode, corpus, tmp_path / "b", cfg)   # nothing left to do
    assert again.chunks == 0 and (again.total_rows, again.total_kept) == (full.rows, kept)
    # a folder whose progress.json predates the counts: they are read off its rows
    state = json.loads((tmp_path / "b" / "progress.json").read_text())
    del state["seed_kept"], state["seed_changed"]
    (tmp_path / "b" / "progress.json").write_text(json.dumps(state))
    again = synthesize(gen, encode, encode, corpus, tmp_path / "b", cfg)
    assert (again.total_kept, again.total_changed) == (kept, full.rows - kept)
    with pytest.raises(ValueError, match="written with top_k=4, this run has top_k=5"):
        synthesize(gen, encode, encode, corpus, tmp_path / "b", SynthConfig(**dict(KW, top_k=5)))


@pytest.mark.slow   # compiles the LLM's programs again for an 8-device mesh
def test_cli_writes_the_same_triplets(setup, tmp_path):
    from embedjax import cli
    from embedjax.synth import SynthConfig, synthesize

    root, llm, corpus, gen, encode = setup
    argv = ["synth", "--llm", str(llm), "--embedder", str(llm), "--corpus", str(root), "--output",
            str(tmp_path / "cli"), "--passages", "4", "--chunk", "4", "--rows-per-shard", "3", "--max-new-tokens",
            "6", "--temperature", "1.0", "--top-p", "1.0", "--top-k", "4", "--negatives", "2", "--yes", " is",
            "--no", " not", "--max-passage-chars", "200", "--batch-size", "8", "--max-prompt-length", "512"]
    assert cli.main(argv) == 0
    cfg = SynthConfig(**dict(KW, num_passages=4))
    synthesize(gen, encode, encode, corpus, tmp_path / "lib", cfg)
    got = [json.loads(x) for p in sorted((tmp_path / "cli").glob("shard-*.jsonl")) for x in p.read_text().splitlines()]
    want = [json.loads(x) for p in sorted((tmp_path / "lib").glob("shard-*.jsonl")) for x in p.read_text().splitlines()]
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        for k in ("query", "task", "seed_id", "positive_id", "negative_ids", "positive", "negatives"):
            assert g[k] == w[k], k
        for k in ("scores", "query_likelihood", "retrieval_scores"):
            np.testing.assert_allclose(g[k], w[k], atol=1e-4)
    settings = json.loads((tmp_path / "cli" / "progress.json").read_text())["settings"]
    assert settings["llm"] == str(llm) and settings["top_k"] == 4
    shutil.rmtree(tmp_path / "lib")


# ----------------------------------------------------------------------------------------------- end to end
# `embedjax synth` as a user runs it: 200 shipped SciFact passages (title + the first 20 words of the text, so
# that the real all-MiniLM-L6-v2 embeds them in seconds), the tiny random Gemma 3 LLM, one few-shot example from
# a file, one device per process.
E2E_PASSAGES, E2E_CHUNK = 200, 32
E2E_ARGS = ["--passages", str(E2E_PASSAGES), "--chunk", str(E2E_CHUNK), "--rows-per-shard", "48",
            "--max-new-tokens", "8", "--temperature", "1.0", "--top-p", "1.0", "--top-k", "5", "--negatives", "2",
            "--yes", " is", "--no", " not", "--max-passage-chars", "120", "--batch-size", "32",
            "--max-prompt-length", "256"]


def _torch_scores(llm_dir: Path, rows: list[dict], passages: dict[str, str]) -> tuple[list, list]:
    """QL (mean log p(" " + query | QL prompt) per query token) and RC (p(" is") / (p(" is") + p(" not")) after the
    RC prompt) of every candidate of every row, from transformers' PyTorch model on the same checkpoint, written
    here from the definitions (not embedjax's code)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # a tiny model: one thread is faster, by far on a busy 2-core machine
    try:
        return _torch_scores_1(llm_dir, rows, passages)
    finally:
        torch.set_num_threads(threads)


def _torch_scores_1(llm_dir: Path, rows: list[dict], passages: dict[str, str]) -> tuple[list, list]:
    import torch
    import transformers

    from embedjax.synth import QL_TEMPLATE, RC_TEMPLATE

    tok = transformers.AutoTokenizer.from_pretrained(str(llm_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(llm_dir), dtype=torch.float32).eval()
    yes, no = (tok(a, add_special_tokens=False)["input_ids"] for a in (" is", " not"))
    assert len(yes) == len(no) == 1

    def logprobs(seqs: list[list[int]], keep: int) -> torch.Tensor:
        """[N, keep, V]: log-softmax of the logits at each sequence's last `keep` positions (left-padded, with
        positions counted from each sequence's first token, as transformers' generate passes them)."""
        out = []
        for s in range(0, len(seqs), 128):
            batch = seqs[s:s + 128]
            width = max(len(x) for x in batch)
            ids = torch.tensor([[0] * (width - len(x)) + x for x in batch])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch])
            with torch.inference_mode():
                logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                               logits_to_keep=keep).logits
            out.append(torch.log_softmax(logits.double(), -1))
        return torch.cat(out)

    ql_seqs, conts, rc_seqs = [], [], []
    for r in rows:
        cont = tok(" " + r["query"], add_special_tokens=False)["input_ids"]
        for d in r["candidates"]["ids"]:
            ql_seqs.append(tok(QL_TEMPLATE.format(passage=passages[d]))["input_ids"] + cont)
            conts.append(cont)
            rc_seqs.append(tok(RC_TEMPLATE.format(passage=passages[d], query=r["query"]))["input_ids"])
    keep = max(len(c) for c in conts) + 1
    ql = [float(lp[keep - 1 - len(c):keep - 1].gather(1, torch.tensor(c)[:, None]).mean())
          for lp, c in zip(logprobs(ql_seqs, keep), conts)]
    rc = [float(1 / (1 + torch.exp(lp[-1, no[0]] - lp[-1, yes[0]]))) for lp in logprobs(rc_seqs, 1)]
    out_ql, out_rc, at = [], [], 0
    for r in rows:
        k = len(r["candidates"]["ids"])
        out_ql.append(ql[at:at + k])
        out_rc.append(rc[at:at + k])
        at += k
    return out_ql, out_rc


@pytest.mark.slow   # 51 s on a quiet 2-core machine (2-2.5 min under load 5-8): three `embedjax synth` processes
def test_cli_killed_mid_run_resumes_to_the_uninterrupted_output(llm_dir, minilm_dir, tmp_path):
    import os
    import re
    import signal
    import subprocess
    import time

    import _processes

    from embedjax.data.sources import doc_text, read_beir_corpus, read_pairs, shipped_path

    full = read_beir_corpus(shipped_path("scifact") / "corpus.jsonl")
    corpus = {k: (t, " ".join(x.split()[:20])) for k, (t, x) in list(full.items())[:E2E_PASSAGES]}
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "title": t, "text": x}) + "\n"
                                                   for k, (t, x) in corpus.items()))
    (tmp_path / "examples.jsonl").write_text(json.dumps(
        {"passage": "Aspirin lowers the risk of a second heart attack.", "task": "Given a medical claim, find "
         "evidence", "query": "does aspirin prevent heart attacks"}) + "\n")
    env = dict(_processes.child_env(1), EMBEDJAX_PROGRESS_SECONDS="0")

    def start(out: str) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{out}.log"
        cmd = [sys.executable, "-m", "embedjax.cli", "synth", "--llm", str(llm_dir), "--embedder", str(minilm_dir),
               "--corpus", str(tmp_path), "--examples", str(tmp_path / "examples.jsonl"),
               "--output", str(tmp_path / out), *E2E_ARGS]
        with open(log, "w") as f:
            return subprocess.Popen(cmd, cwd=_processes.REPO, env=env, stdout=f, stderr=subprocess.STDOUT), log

    def finish(p: subprocess.Popen, log: Path, timeout: float = 300) -> str:
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            raise
        assert rc == 0, log.read_text()[-3000:]
        return log.read_text()

    chunks = -(-E2E_PASSAGES // E2E_CHUNK)
    # killed with SIGKILL once its first chunk is recorded (it compiles the programs the later runs reuse from
    # the persistent compilation cache the test session shares with its children)
    victim, victim_log = start("run")
    progress = tmp_path / "run" / "progress.json"
    deadline = time.time() + 300
    while victim.poll() is None and time.time() < deadline:
        try:
            done_at_kill = json.loads(progress.read_text())["chunks_done"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            done_at_kill = 0
        if done_at_kill >= 1:
            os.kill(victim.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    assert victim.wait(timeout=60) == -signal.SIGKILL, victim_log.read_text()[-3000:]
    assert 1 <= json.loads(progress.read_text())["chunks_done"] < chunks

    reference, reference_log = start("reference")   # uninterrupted, beside the resumed run
    resumed, resumed_log = start("run")
    out = finish(resumed, resumed_log)
    finish(reference, reference_log)

    # the same bytes as the uninterrupted run: nothing done twice, nothing lost
    assert _files(tmp_path / "run") == _files(tmp_path / "reference")
    np.testing.assert_array_equal(np.load(tmp_path / "run" / "corpus_embeddings.npy"),
                                  np.load(tmp_path / "reference" / "corpus_embeddings.npy"))
    state = json.loads(progress.read_text())
    rows = [json.loads(line) for p in sorted((tmp_path / "run").glob("shard-*.jsonl"))
            for line in p.read_text().splitlines()]
    numbers = [int(r["query_id"].split("-")[1]) for r in rows]
    assert numbers == sorted(set(numbers)) and len(rows) + state["skipped"] == E2E_PASSAGES
    assert set(numbers) <= set(range(E2E_PASSAGES)) and len({r["seed_id"] for r in rows}) == len(rows)
    assert state["chunks_done"] == chunks and state["rows"] == len(rows) >= 0.9 * E2E_PASSAGES
    assert [len(p.read_text().splitlines()) for p in sorted((tmp_path / "run").glob("shard-*.jsonl"))] == \
        [48] * (len(rows) // 48) + ([len(rows) % 48] if len(rows) % 48 else [])
    assert sum(read_pairs(p)[1].examples for p in (tmp_path / "run").glob("shard-*.jsonl")) == len(rows)

    # well-formed rows
    for r in rows:
        c = r["candidates"]
        assert r["query"].strip() == r["query"] != "" and r["task"].strip() == r["task"] != ""
        assert len(c["ids"]) in (5, 6) and r["seed_id"] in c["ids"] and len(set(c["ids"])) == len(c["ids"])
        assert all(len(c[k]) == len(c["ids"]) for k in ("retrieval", "ql", "rc", "fused"))
        assert c["retrieval"][:5] == sorted(c["retrieval"][:5], reverse=True)
        assert r["positive_id"] in c["ids"] and r["positive"] == dict(zip(("title", "text"),
                                                                          corpus[r["positive_id"]]))
        assert len(r["negative_ids"]) == 2 and r["positive_id"] not in r["negative_ids"]
        assert r["negatives"] == [dict(zip(("title", "text"), corpus[d])) for d in r["negative_ids"]]
        assert len(r["scores"]) == len(r["query_likelihood"]) == len(r["retrieval_scores"]) == 3
        assert all(0.0 < x < 1.0 for x in c["rc"]) and all(x < 0.0 for x in c["ql"])

    # the relabelling: the best candidate by the LLM's scores, recomputed with PyTorch, is the positive and the
    # worst are the negatives (reciprocal rank fusion of QL and RC, k = 60, ties to the better retrieved)
    passages = {k: doc_text(*v)[:120] for k, v in corpus.items()}
    ql, rc = _torch_scores(llm_dir, rows, passages)
    diff = max(max(np.abs(np.subtract(r["candidates"]["ql"], q)).max(), np.abs(np.subtract(r["candidates"]["rc"],
                                                                                             p)).max())
               for r, q, p in zip(rows, ql, rc))
    assert diff <= 1e-4

    def ranks(x):   # 1 = best
        order = sorted(range(len(x)), key=lambda i: (-x[i], i))
        return {i: n + 1 for n, i in enumerate(order)}

    checked = 0
    for r, q, p in zip(rows, ql, rc):
        gaps = [abs(a - b) for s in (q, p) for i, a in enumerate(s) for b in s[i + 1:]]
        if min(gaps) <= 2 * diff:   # two candidates closer than the two implementations differ: rank unsure
            continue
        rq, rp = ranks(q), ranks(p)
        fused = [1 / (60 + rq[i]) + 1 / (60 + rp[i]) for i in range(len(q))]
        best = ranks(fused)
        ids = r["candidates"]["ids"]
        by_rank = sorted(range(len(ids)), key=lambda i: best[i])
        assert r["positive_id"] == ids[by_rank[0]], r["query_id"]
        assert r["negative_ids"] == [ids[i] for i in by_rank[::-1][:2]], r["query_id"]
        checked += 1
    assert checked >= 0.9 * len(rows)

    # how often the positive changed, over all 200 passages (the killed run's included), and the progress lines
    kept = sum(r["positive_id"] == r["seed_id"] for r in rows)
    assert (state["seed_kept"], state["seed_changed"]) == (kept, len(rows) - kept) and 0 < kept < len(rows)
    assert (f"positives over all {E2E_PASSAGES} passages done ({len(rows)} triplets, {state['skipped']} skipped): "
            f"{kept} kept their seed passage ({100 * kept / len(rows):.1f}%), {len(rows) - kept} got another "
            f"passage") in out
    this_run = re.search(r"(\d+) triplets from (\d+) passages in (\d+) chunks this run", out)
    assert this_run and int(this_run[3]) < chunks and int(this_run[1]) < len(rows)
    bar = [(int(a), b) for a, b in re.findall(r"synth: (\d+)/200 passage \(\d+%\), [\d.]+ passage/s(, ETA \S+)?",
                                              out)]
    assert bar and bar[0][0] > E2E_CHUNK and bar[-1][0] == E2E_PASSAGES   # counted from what was done before
    assert all(eta.startswith(", ETA 0:") for n, eta in bar[:-1])


def test_examples_file(tmp_path):
    from embedjax.synth import SynthConfig, query_prompt, read_examples, task_prompt

    path = tmp_path / "examples.jsonl"
    path.write_text(json.dumps({"passage": "P one.", "task": "T one", "query": "q one"}) + "\n\n"
                    + json.dumps({"passage": "P two.", "task": "T two", "query": "q two", "extra": 1}) + "\n")
    examples = read_examples(path)
    assert examples == (("P one.", "T one", "q one"), ("P two.", "T two", "q two"))
    cfg = SynthConfig(examples=[list(e) for e in examples])
    assert cfg.examples == examples
    assert task_prompt("X", cfg.examples).endswith("Passage: P two.\nTask: T two\nQuery: q two\n\nPassage: X\nTask:")
    assert query_prompt("X", "T", cfg.examples).endswith("Passage: X\nTask: T\nQuery:")
    path.write_text(json.dumps({"passage": "P", "task": " ", "query": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"examples.jsonl:1: .* task missing"):
        read_examples(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="no few-shot examples"):
        read_examples(path)
    with pytest.raises(ValueError, match="few-shot example 0 must be three non-empty strings"):
        SynthConfig(examples=[("P", "T")])
