"""Every loss a config can name trains exactly that form from `embedjax train`; the registries match what the
code implements; a bad config is a one-line error with exit status 2 that leaves the workdir as it was."""
import json
import random

import jax
import numpy as np
import pytest

pytest.importorskip("seqio")

from embedjax.config import CHOICES, LOSS_NAMES, ConfigError, load_config  # noqa: E402

TINY = "configs/tiny.py"
ONE_STEP = ["num_steps=1", "log_every_steps=1", "eval.before=False", "checkpoint_every_steps=0"]


def test_registries_match_the_implementations():
    from embedjax import optim
    from embedjax.objectives import OBJECTIVES

    assert set(OBJECTIVES) == set(LOSS_NAMES) == set(CHOICES["loss.name"])
    for name in CHOICES["optim.name"]:
        optim.make_optimizer({"name": name, "lr": 1e-3}, 10)
    for decay in CHOICES["optim.decay"]:
        optim.schedule(1e-3, 10, 2, decay)
    with pytest.raises(ValueError, match="not supported"):
        optim.make_optimizer({"name": "sgd"}, 10)


class _Recording(dict):
    def __init__(self, *a):
        super().__init__(*a)
        self.read = set()

    def __getitem__(self, k):
        self.read.add(k)
        return super().__getitem__(k)

    def get(self, k, default=None):
        self.read.add(k)
        return super().get(k, default)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_each_loss_reads_exactly_the_keys_the_config_allows(name):
    """config.LOSS_KEYS (what `validate` lets a config set for a loss) is what the objective reads."""
    from embedjax import sharding
    from embedjax.config import LOSS_KEYS, base_config
    from embedjax.objectives import OBJECTIVES

    cfg = _Recording(dict(base_config().loss))
    cfg.update(name=name, matryoshka_dims=(8, 4), matryoshka_weights=(1.0, 0.5))
    OBJECTIVES[name](cfg, sharding.make_mesh({"data": -1}))
    # 2D Matryoshka wraps any objective in make_objective (objectives.two_d_matryoshka), not in its builder
    two_d = {"matryoshka_layers", "matryoshka_layer_weights"}
    assert two_d <= set(LOSS_KEYS[name])
    assert cfg.read - {"name"} == set(LOSS_KEYS[name]) - two_d


@pytest.mark.parametrize("override,message", [
    ("loss.nope=1", "unknown key 'loss.nope'"),
    ("loss.name='ring'", "loss.name 'ring' is not one of in_batch_softmax, in_batch_softmax_sharded, "
                         "in_batch_softmax_ring, sigmoid, sigmoid_sharded"),
    ("optim.name='sgd'", "optim.name 'sgd' is not one of adamw, adafactor"),
    ("optim.decay='exp'", "optim.decay 'exp' is not one of linear, cosine, constant"),
    ("data.kind='csv'", "data.kind 'csv' is not one of beir, pairs, stsb"),
    ("eval.tasks=('mteb:x',)", "eval.tasks entry 'mteb:x': expected KIND:PATH[:SPLIT] with KIND one of beir, stsb"),
    ("loss.name='cosent'", "loss.name 'cosent' needs data.kind='stsb'"),
    ("loss.name='margin_mse'", "set data.num_negatives >= 1"),
    ("loss.learn_temperature=True;loss.name='sigmoid'", "loss.learn_temperature is not used by loss.name 'sigmoid' "
                                                        "(it reads loss.sigmoid_t, loss.sigmoid_b, "),
    ("loss.temperature=0.1;loss.name='cosent';data.kind='stsb'", "loss.temperature is not used by loss.name 'cosent'"),
])
def test_bad_names_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        load_config(TINY, override.split(";"))


def test_a_config_file_setting_an_unknown_key_is_an_error(tmp_path):
    """A key a config sets that nothing reads (e.g. a typo, or loss.sigmoid_bias for loss.sigmoid_b) is an
    error naming it and the keys that exist there, not a silently ignored setting."""
    path = tmp_path / "typo.py"
    path.write_text("from embedjax.config import base_config\n\n\ndef get_config(arg=None):\n"
                    "    c = base_config()\n    c.init_from = 'x'\n    c.loss.sigmoid_bias = -5.0\n    return c\n")
    with pytest.raises(ConfigError, match=r"unknown key 'loss.sigmoid_bias'; known keys under 'loss': angle|"
                                          r"unknown key 'loss.sigmoid_bias'; known keys under 'loss': bidirectional"):
        load_config(str(path))


@pytest.mark.parametrize("override", ["--config.loss.nope=1", "--config.loss.name=ring", "--config.optim.name=sgd",
                                      "--config.data.kind=csv", "--config.batch_size=12"])
def test_train_cli_bad_config_exit_2_one_line_workdir_untouched(tmp_path, capsys, override):
    from embedjax.cli import main

    workdir = tmp_path / "run"
    assert main(["train", "--config", TINY, "--workdir", str(workdir), "--distributed", "off", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(("embedjax train: error: config: ",
                                                "embedjax train: error: override ")), err
    assert override.split("=")[0].removeprefix("--config.").split(".")[-1] in err[0] or "batch_size" in err[0]
    assert not workdir.exists()


def _losses(workdir):
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _rel_close(a, b, rtol):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        err, scale = float(np.abs(x - y).max()), float(np.abs(y).max()) or 1.0
        assert err <= rtol * scale, (jax.tree_util.keystr(path), err, scale)


@pytest.mark.slow
@pytest.mark.parametrize("dense,forms,extra", [
    ("in_batch_softmax", ("in_batch_softmax_sharded", "in_batch_softmax_ring"),
     ["loss.learn_temperature=True", "data.num_negatives=2", "loss.same_tower=True", "loss.margin=0.05"]),
    ("sigmoid", ("sigmoid_sharded",), []),
])
def test_shard_map_forms_train_and_equal_the_dense_form(tmp_path, dense, forms, extra):
    """One step of `embedjax train`'s code from the same weights and batch: the loss and every updated
    parameter agree (float32 reduction order differs between the programs: relative 1e-5)."""
    from embedjax.trainer import train_and_evaluate

    data = []
    if "data.num_negatives=2" in extra:   # triplets, some rows with 1 negative: padded slots are masked
        data = ["data.kind='pairs'", f"data.path='{_triplets(tmp_path)}'"]
    runs = {}
    for name in (dense, *forms):
        cfg = load_config(TINY, ONE_STEP + extra + data + [f"loss.name='{name}'"])
        runs[name] = train_and_evaluate(cfg, tmp_path / name)
    l_dense = _losses(tmp_path / dense)[1]
    for name in forms:
        assert _losses(tmp_path / name)[1] == pytest.approx(l_dense, rel=1e-5), name
        _rel_close(runs[name]["state"].params, runs[dense]["state"].params, 1e-5)


def test_ring_step_permutes_and_never_gathers_documents():
    """The compiled train steps of the ring forms (`sigmoid_sharded`, `in_batch_softmax_ring`) move documents
    with collective-permutes and have no all-gather; `in_batch_softmax_sharded` has its one all-gather."""
    from embedjax import sharding
    from embedjax.aot import model_config_from
    from embedjax.experiment import assemble

    hlo = {}
    for name in ("sigmoid_sharded", "in_batch_softmax_ring", "in_batch_softmax_sharded"):
        cfg = load_config(TINY, [f"loss.name='{name}'"])
        exp = assemble(cfg, sharding.make_mesh(dict(cfg.mesh)))     # what `embedjax train` / `aot` compile
        model_cfg = model_config_from(cfg)
        state, shards = exp.abstract_state(model_cfg)
        with jax.set_mesh(exp.mesh):
            hlo[name] = exp.train_step(model_cfg, shards).lower(state, exp.batch_spec()).compile().as_text()
    for ring in ("sigmoid_sharded", "in_batch_softmax_ring"):
        assert "collective-permute" in hlo[ring] and "all-gather" not in hlo[ring], ring
    assert "all-gather" in hlo["in_batch_softmax_sharded"]


def _triplets(tmp_path, n=64, k=2):
    """Triplets with teacher scores (positive first), some rows with fewer negatives than k."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(300)]

    def text():
        return " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))

    path = tmp_path / "triplets.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            negs = [text() for _ in range(k if i % 5 else k - 1)]
            f.write(json.dumps({"query": text(), "positive": text(), "negatives": negs,
                                "scores": [5.0 + rng.random()] + [rng.uniform(-2, 3) for _ in negs]}) + "\n")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name", ["distill_kl", "margin_mse"])
def test_distillation_trains_from_teacher_scores(tmp_path, name):
    from embedjax.trainer import train_and_evaluate

    cfg = load_config(TINY, ["num_steps=16", "log_every_steps=1", "eval.before=False", "data.kind='pairs'",
                             f"data.path='{_triplets(tmp_path)}'", "data.num_negatives=2", f"loss.name='{name}'",
                             "optim.lr=3e-3"])
    res = train_and_evaluate(cfg, tmp_path / "run")
    losses = _losses(tmp_path / "run")
    assert res["final_step"] == 16 and all(np.isfinite(v) for v in losses.values())
    # it learns the teacher's scores: the 4th pass over the 64 rows (4 batches an epoch) beats the 1st
    assert np.mean([losses[s] for s in range(13, 17)]) < np.mean([losses[s] for s in range(1, 5)])
    if name == "margin_mse":
        assert "teacher_margin" in res["last_train_metrics"]
    else:
        assert "teacher_entropy" in res["last_train_metrics"]
