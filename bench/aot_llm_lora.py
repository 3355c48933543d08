"""Per-chip memory of one training step of the LLM embedders (configs/qwen3_lora.py, configs/gemma3_lora.py) on a
TPU topology, full fine-tuning vs LoRA, compiled ahead of time by `embedjax aot` with libtpu's compile-only
devices (no TPU, no weights: each model's published config.json is written to a folder the run starts from).

    python bench/aot_llm_lora.py [--topology v5e-16] [--length 512]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 2 ** 30

# the published config.json values (Qwen/Qwen3-0.6B, google/gemma-3-1b-pt); no tokenizer or weights needed
CONFIGS = {
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=1024,
                  intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000,
                  tie_word_embeddings=True, use_sliding_window=False, sliding_window=None, max_window_layers=28,
                  attention_bias=False, hidden_act="silu", bos_token_id=151643, eos_token_id=151645),
    "gemma3": dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", vocab_size=262144,
                   hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                   num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
                   sliding_window_pattern=6, rope_theta=1000000, rope_local_base_freq=10000,
                   max_position_embeddings=32768, rms_norm_eps=1e-6, rope_scaling=None, attn_logit_softcapping=None,
                   final_logit_softcapping=None, hidden_activation="gelu_pytorch_tanh"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--topology", default="v5e-16")
    p.add_argument("--length", type=int, default=512, help="query and document tokens")
    p.add_argument("--models", default="qwen3,gemma3")
    p.add_argument("--set", action="append", default=[], help="further config overrides, KEY=VALUE")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            folder = Path(tmp) / model
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps(CONFIGS[model]))
            for variant in ("", ":full"):
                out = Path(tmp) / f"{model}{variant.replace(':', '-')}.json"
                cmd = [sys.executable, "-m", "embedjax.cli", "aot", "--config", f"configs/{model}_lora.py{variant}",
                       "--topology", args.topology, "--set", f"init_from={folder}",
                       "--set", f"max_query_length={args.length}", "--set", f"max_document_length={args.length}",
                       "--json", str(out), *[a for s in args.set for a in ("--set", s)]]
                t0 = time.time()
                r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
                wall = time.time() - t0
                if r.returncode not in (0, 1) or not out.is_file():   # 1: "does not fit"
                    sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
                rows.append((model, "full fine-tune" if variant else "LoRA r=16", json.loads(out.read_text())))
                print(f"done: {model}{variant} in {wall:.0f} s", file=sys.stderr, flush=True)
    print(f"{args.topology}, batch {rows[0][2]['batch_size']} x {args.length} tokens (queries and documents), "
          f"bfloat16 compute, remat full; load {os.getloadavg()[0]:.2f}")
    print("| model | training | parameters | mesh | peak per chip | of HBM | fits | compile |")
    print("|---|---|---|---|---|---|---|---|")
    for model, kind, rep in rows:
        print(f"| {model} | {kind} | {rep['num_params'] / 1e6:.0f}M | {rep['mesh']} | "
              f"{rep['peak_bytes'] / GiB:.2f} GiB | {(rep['hbm_bytes'] or 0) / GiB:.0f} GiB | "
              f"{'yes' if rep['fits'] else 'no'} | {rep['compile_seconds'] or 0:.0f} s |")


if __name__ == "__main__":
    main()
