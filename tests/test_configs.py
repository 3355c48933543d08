"""Every config loads, validates, opens its docstring with the command to run it, and builds its objective."""
from pathlib import Path

import pytest

from embedjax.config import ConfigError, load_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.py"))
VARIANTS = {"gtr.py": [None, "tiny", "xxl"], "gecko.py": [None, "pre"], "e5.py": [None, "pre"], "sentence_t5.py": ["base", "xxl"],
            "qwen3_lora.py": [None, "full"], "gemma3_lora.py": [None, "full"]}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    from embedjax.objectives import make_objective

    doc = (path.read_text().split('"""')[1])
    assert "embedjax train --config configs/" in doc or "embedjax aot" in doc, f"{path}: docstring lacks its command"
    for variant in VARIANTS.get(path.name, [None]):
        cfg = load_config(f"{path}:{variant}" if variant else str(path))
        mesh = None
        if cfg.loss.name.endswith("_sharded"):
            from embedjax import sharding
            mesh = sharding.make_mesh(dict(cfg.mesh))
        make_objective(cfg.loss, mesh)
        assert cfg.batch_size > 0


def test_overrides_and_errors(tmp_path):
    cfg = load_config("configs/tiny.py", ["optim.lr=3e-5", "batch_size=8", "loss.matryoshka_dims=(32,16)"])
    assert cfg.optim.lr == 3e-5 and cfg.batch_size == 8 and tuple(cfg.loss.matryoshka_dims) == (32, 16)
    with pytest.raises(ConfigError, match="unknown key 'optim.nope'"):
        load_config("configs/tiny.py", ["optim.nope=1"])
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(str(tmp_path / "missing.py"))
    with pytest.raises(ConfigError, match="matryoshka_dims must be decreasing"):
        load_config("configs/tiny.py", ["loss.matryoshka_dims=(16,32)"])
    with pytest.raises(ConfigError, match="not divisible by grad_cache_chunks"):
        load_config("configs/tiny.py", ["grad_cache_chunks=3"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_alone_as_tpu_run_ships_it(tmp_path, path):
    """tpu/run.sh copies only the named config file to the workers: each config loads from a folder holding
    nothing else (it imports from the installed package, never from a sibling file)."""
    import ast
    import shutil

    imported = {n.module.split(".")[0] for n in ast.walk(ast.parse(path.read_text()))
                if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name.split(".")[0] for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Import)
                 for a in n.names}
    assert imported <= {"embedjax", "__future__"}, f"{path.name} imports {sorted(imported)}"
    alone = tmp_path / "embedjax-configs"
    alone.mkdir()
    shutil.copy(path, alone / path.name)
    variant = VARIANTS.get(path.name, [None])[0]
    cfg = load_config(f"{alone / path.name}:{variant}" if variant else str(alone / path.name))
    assert cfg.batch_size > 0
