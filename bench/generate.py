"""embedjax generation vs transformers' PyTorch `generate`: new tokens/s, greedy, for the same random Qwen3
checkpoint (4 layers, hidden 512, 8 query / 4 key-value heads of 64, MLP 1536, the tests' 1000-token BPE
tokenizer trained on SciFact), the same prompts (SciFact passage openings of 8..48 words, left-padded), batch and
number of new tokens, float32, same process (`_harness.compare`: both warmed up, interleaved rounds, median and
spread, load recorded, a JSON line in bench/results.jsonl). EOS is off on both sides so every row makes exactly
`--new-tokens` tokens (the same work); the tokens are checked equal before timing.

    python bench/generate.py [--rounds 5] [--batch-size 16] [--new-tokens 64]
    python bench/generate.py --threads 1   # one thread each (torch.set_num_threads(1); XLA's CPU client with
                                            # one intra-op thread): a fairer split of a machine others also use
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))


def prompts(n: int) -> list[str]:
    corpus = HERE.parent / "embedjax" / "data" / "shipped" / "scifact" / "corpus.jsonl"
    rows = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines()[:n]]
    return [" ".join(r["text"].split()[:8 + (40 * i) // max(1, n - 1)]) for i, r in enumerate(rows)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads of both sides (default: each library's own, all cores)")
    args = ap.parse_args()
    if args.threads:   # before jax is imported
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   f"intra_op_parallelism_threads={args.threads}").strip()

    import torch
    import transformers

    import _llm
    from embedjax.generate import Generator
    from embedjax.models.convert import load_lm

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=_llm.V, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                                   max_position_embeddings=512, pad_token_id=0, eos_token_id=1,
                                   tie_word_embeddings=True)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    tok = _llm.tokenizer("gemma3")   # <bos> in front, nothing appended: a prompt ends where generation starts
    folder = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    tok.padding_side = "left"

    texts = prompts(args.batch_size)
    N, B = args.new_tokens, args.batch_size
    lcfg, params, jtok = load_lm(folder)
    gen = Generator(lcfg, params, jtok, max_prompt_length=256, eos_token_ids=())
    enc = tok(texts, return_tensors="pt", padding=True)
    gcfg = transformers.GenerationConfig(do_sample=False, max_new_tokens=N, min_new_tokens=N, eos_token_id=None,
                                         pad_token_id=0, bos_token_id=2)

    def run_embedjax():
        return gen.generate_tokens(texts, max_new_tokens=N, batch_size=B, show_progress=False)

    def run_torch():
        with torch.inference_mode():
            return model.generate(**enc, generation_config=gcfg)

    a = [g.token_ids for g in run_embedjax()]
    b = run_torch()[:, enc["input_ids"].shape[1]:].tolist()
    same = sum(x == y for x, y in zip(a, b))
    first_diff = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None) for x, y in zip(a, b)]

    import _harness
    from _harness import compare, report

    lengths = enc["attention_mask"].sum(1).tolist()
    threads = f", {args.threads} thread{'s' if args.threads > 1 else ''} each" if args.threads else ""
    res = compare(f"generate: Qwen3 4 x 512 random, {B} SciFact prompts ({min(lengths)}-{max(lengths)} tokens), "
                  f"{N} new tokens, greedy{threads}", {"embedjax": run_embedjax, "transformers generate": run_torch},
                  work=B * N, unit="tokens/s", rounds=args.rounds, modules=("torch", "transformers"),
                  meta={"batch_size": B, "new_tokens": N, "prompt_tokens": lengths,
                        "rows_equal_token_for_token": same, "torch_threads": torch.get_num_threads(),
                        "threads_option": args.threads, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                        "compilations": gen.num_compilations}, write=False)
    a, b = res["sides"]["embedjax"]["rate"], res["sides"]["transformers generate"]["rate"]
    res["row"] = {   # a line of README's table of real peers (bench/run_all.py)
        "benchmark": f"greedy generation, Qwen3 4 x 512 random, {B} prompts x {N} new tokens{threads}",
        "command": "`python bench/generate.py" + (f" --threads {args.threads}" if args.threads else "") + "`",
        "embedjax": f"{a:.0f} tokens/s", "peers": f"transformers `generate` (PyTorch): {b:.0f} tokens/s",
        "check": f"**{a / b:.2f}x**; greedy tokens equal on {same}/{B} rows"}
    with open(_harness.RESULTS, "a", encoding="utf-8") as f:
        f.write(json.dumps(res) + "\n")
    print(report(res))
    print(f"  greedy tokens equal on {same} / {B} rows"
          + ("" if same == B else f" (first differences at new token {first_diff}: float32 near-ties)")
          + f"; {gen.num_compilations} XLA compilations")


if __name__ == "__main__":
    main()
