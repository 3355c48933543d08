"""2D Matryoshka on shipped SciFact with all-MiniLM-L6-v2: nDCG@10 of the sub-network of the first 3 layers at 128
dims (and of the full model at 384) for the un-fine-tuned model, the README's main job (plain fine-tuning), and
the same job with 2D Matryoshka (``loss.matryoshka_layers=(3,)``, ``loss.matryoshka_dims=(384, 128)``): same
data, steps, seed and batch. The two trainings run as `embedjax train` on 4 fake devices, one after the other;
the evaluations run in this process on the same test split.

    python bench/matryoshka_2d_scifact.py [--workdirs runs/m2d] [--skip-training]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

CONFIG = "configs/minilm_scifact.py"
RUNS = {
    "fine-tuned (plain)": [],
    "fine-tuned (2D Matryoshka)": ["--config.loss.matryoshka_layers=(3,)", "--config.loss.matryoshka_dims=(384,128)"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdirs", default="runs/m2d")
    p.add_argument("--skip-training", action="store_true", help="evaluate existing workdirs only")
    args = p.parse_args()
    root = Path(args.workdirs)
    t_all = time.time()
    for i, (name, overrides) in enumerate(RUNS.items()):
        wd = root / f"run{i}"
        if args.skip_training or (wd / "final").is_dir():
            continue
        cmd = [sys.executable, "-m", "embedjax.cli", "train", "--config", CONFIG, "--workdir", str(wd),
               "--fake-devices", "4", "--config.eval.tasks=()", *overrides]
        print("$", " ".join(cmd), flush=True)
        t0 = time.time()
        subprocess.run(cmd, check=True)
        print(f"  trained in {time.time() - t0:.0f} s", flush=True)

    from embedjax.evaluate.ship_cache import pretrained_encoder
    from embedjax.config import load_config
    from embedjax.encoder import Encoder
    from embedjax.evaluate import encode_fn_from_encoder
    from embedjax.evaluate.retrieval import RetrievalEvaluator
    from embedjax.data.sources import shipped_path

    config = load_config(CONFIG)
    ev = {d: RetrievalEvaluator.from_beir(shipped_path("scifact"), "test", show_progress=False, dim=d)
          for d in (None, 128)}
    models = {"un-fine-tuned": pretrained_encoder(config)}
    for i, name in enumerate(RUNS):
        models[name] = Encoder.load(root / f"run{i}" / "final")
    print(f"SciFact test nDCG@10 x100; load {os.getloadavg()[0]:.2f}")
    print("| model | 6 layers, 384 dims | 3 layers, 384 dims | 3 layers, 128 dims |")
    print("|---|---|---|---|")
    for name, enc in models.items():
        sub = enc.truncated(3)
        row = [ev[None].run(encode_fn_from_encoder(enc))["ndcg@10"],
               ev[None].run(encode_fn_from_encoder(sub))["ndcg@10"],
               ev[128].run(encode_fn_from_encoder(sub))["ndcg@10"]]
        print(f"| {name} | " + " | ".join(f"{100 * v:.2f}" for v in row) + " |", flush=True)
    print(f"({time.time() - t_all:.0f} s; load {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
