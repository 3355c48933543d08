"""Writes the corpus embeddings of a training config's *unchanged pretrained model* into the shipped cache
(`embedjax/data/shipped/corpus_embeddings`), so that the evaluation before training is read back instead of
recomputed on a fresh clone (the README's main job):

    python -m embedjax.evaluate.ship_cache --config configs/minilm_scifact.py

It builds the model and runs the evaluation exactly as `embedjax train` does before its first step, into a
temporary cache, then moves the files it wrote into the shipped folder. The cache key is a hash of the config,
the weights, the corpus and the prompt, so the files are found only by that same computation;
tests/evaluate/test_shipped_cache.py checks sampled rows against fresh encodings.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("embedjax.ship_cache")


class _NoWriter:
    def write(self, step: int, metrics: dict) -> None:
        pass


def pretrained_encoder(config):
    """The Encoder `embedjax train` evaluates before its first step (single device, no workdir)."""
    import jax

    from embedjax import sharding
    from embedjax.data.prompts import config_prompt
    from embedjax.encoder import Encoder
    from embedjax.experiment import assemble
    from embedjax.models.source import resolve

    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    exp = assemble(config, mesh)
    source = resolve(config, weights=True)
    state, _ = exp.create_state(source.config, jax.random.key(config.seed), pretrained=source.params)
    return Encoder(source.config, state.params["model"], source.tokenizer, name=str(config.init_from), mesh=mesh,
                   prompt=config_prompt(config.data))


def ship(config, dest: Path) -> list[Path]:
    """Runs the before-training evaluation of `config` into a temporary cache; moves its files into `dest`."""
    from embedjax.trainer import _evaluation

    encoder = pretrained_encoder(config)
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        evaluate = _evaluation(config, encoder, _NoWriter())
        if evaluate is None:
            raise SystemExit("config has no eval.tasks: nothing to cache")
        for ev in evaluate.evaluators.values():
            if hasattr(ev, "cache_dir"):
                ev.cache_dir = Path(tmp)
        metrics = evaluate("before", 0, encoder.params)
        dest.mkdir(parents=True, exist_ok=True)
        for f in sorted(Path(tmp).iterdir()):
            shutil.move(str(f), dest / f.name)
            written.append(dest / f.name)
    for k, v in metrics.items():
        log.info("%s = %.4f", k, v)
    return written


def main(argv: list[str] | None = None) -> int:
    from embedjax.config import load_config
    from embedjax.evaluate.retrieval import SHIPPED_CACHE_DIR

    p = argparse.ArgumentParser(prog="python -m embedjax.evaluate.ship_cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a training config (file[:arg]), e.g. configs/minilm_scifact.py")
    p.add_argument("--dest", default=str(SHIPPED_CACHE_DIR), help="folder to write into (default: the shipped one)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for path in ship(load_config(args.config), Path(args.dest)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
