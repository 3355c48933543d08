"""`embedjax eval` with the real all-MiniLM-L6-v2 on a slice of shipped SciFact (25 test queries, their relevant
documents and 150 others) equals the peer computed independently on the same slice: sentence-transformers'
embeddings, a cosine top-10 in numpy, and pytrec_eval's nDCG@10."""
import json

import numpy as np
import pytest

from embedjax.data.sources import shipped_path


def _slice(dst):
    src = shipped_path("scifact")
    qrels = [l.split("\t") for l in (src / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    qids = sorted({q for q, _, _ in qrels}, key=int)[:25]
    rel = {(q, d) for q, d, _ in qrels if q in qids}
    want_docs = {d for _, d in rel}
    corpus = [json.loads(l) for l in (src / "corpus.jsonl").read_text().splitlines()]
    keep = [c for c in corpus if c["_id"] in want_docs] + [c for c in corpus if c["_id"] not in want_docs][:150]
    queries = [json.loads(l) for l in (src / "queries.jsonl").read_text().splitlines()]
    queries = [q for q in queries if q["_id"] in qids]
    (dst / "qrels").mkdir(parents=True)
    (dst / "corpus.jsonl").write_text("".join(json.dumps(c) + "\n" for c in keep))
    (dst / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (dst / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                            "".join(f"{q}\t{d}\t1\n" for q, d in sorted(rel)))
    return keep, queries, rel


def test_eval_cli_equals_sentence_transformers_and_pytrec_eval(tmp_path, minilm_dir):
    import pytrec_eval
    from sentence_transformers import SentenceTransformer

    from embedjax.cli import main

    corpus, queries, rel = _slice(tmp_path / "slice")
    out = tmp_path / "m.json"
    assert main(["eval", "--model", str(minilm_dir), "--task", "beir", "--data", str(tmp_path / "slice"),
                 "--no-cache", "--no-progress", "--output", str(out)]) == 0
    got = json.loads(out.read_text())["metrics"]["ndcg@10"]

    st = SentenceTransformer(str(minilm_dir), device="cpu")
    d = st.encode([(c["title"] + " " + c["text"]).strip() for c in corpus], batch_size=64,
                  normalize_embeddings=True)
    q = st.encode([x["text"] for x in queries], normalize_embeddings=True)
    scores = q @ d.T
    run = {}
    for i, x in enumerate(queries):
        top = np.argsort(-scores[i])[:10]
        run[x["_id"]] = {corpus[j]["_id"]: float(scores[i, j]) for j in top}
    qrels = {}
    for qq, dd in rel:
        qrels.setdefault(qq, {})[dd] = 1
    ev = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"})
    peer = float(np.mean([v["ndcg_cut_10"] for v in ev.evaluate(run).values()]))
    assert 0.3 < peer < 1.0
    assert got == pytest.approx(peer, abs=2e-4), (got, peer)
