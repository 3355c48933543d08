"""`embedjax synth` (Gecko / FRet synthetic triplets) on a tiny random Gemma 3 LLM (tests/_llm.py), which also
serves as the embedder (last-token pooling), over 40 SciFact documents:

- every row is what its recorded pieces say: the task is the chunk's sampled generation, the candidates the
  embedder's top-k (+ the seed passage), QL / RC the Generator's scores, the positive the best fused candidate,
  the negatives the worst; the shards read back with `read_pairs`; rows + skipped = passages;
- a run stopped after one chunk, with a half-written line and a stray shard left behind (a crash), resumes to
  byte-identical shards and progress; other settings on the folder are refused;
- the CLI (`embedjax synth`, the Generator data-parallel over the 8 fake devices) writes the same triplets."""
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
def setup(tmp_path_factory):
    from embedjax.data.sources import read_beir_corpus, shipped_path
    from embedjax.encoder import Encoder
    from embedjax.generate import Generator
    from embedjax.models.convert import load_lm

    root = tmp_path_factory.mktemp("synth")
    llm = _llm.write_checkpoint("gemma3", root / "llm")
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
    assert synthesize(gen, encode, encode, corpus, tmp_path / "b", cfg).chunks == 0   # nothing left to do
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
