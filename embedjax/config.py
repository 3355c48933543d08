"""Experiment configs: Python files under configs/ exposing `get_config(arg: str | None) -> ConfigDict`
(big_vision style), loaded with an optional `:variant` suffix and dotted command-line overrides.

    cfg = load_config("configs/minilm_scifact.py:tiny", ["optim.lr=3e-5", "batch_size=16"])

No jax import here.
"""
from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path
from typing import Any, Sequence

import ml_collections

from embedjax import errors

ConfigDict = ml_collections.ConfigDict


ConfigError = errors.ConfigError   # defined in embedjax/errors.py (one module of error types)


# ------------------------------------------------------------------------------------------ registries
# Every config key that names a choice, with the names the code implements. `validate` checks a config against
# these (and against the keys of `base_config`) before anything is written to a workdir; tests check that each
# registry matches its implementation (objectives.OBJECTIVES, optim, the data kinds, the evaluators).
LOSS_NAMES: tuple[str, ...] = ("in_batch_softmax", "in_batch_softmax_sharded", "in_batch_softmax_ring",
                               "sigmoid", "sigmoid_sharded", "cosent", "angle", "distill_kl", "margin_mse")
# loss.name -> the loss.* keys it reads (tests/test_objectives.py checks this against what each objective reads).
_WRAP_KEYS = ("matryoshka_dims", "matryoshka_weights", "matryoshka_layers", "matryoshka_layer_weights",
              "quantization_aware", "quantization_weight", "spread_out_weight")
_SOFTMAX_KEYS = ("temperature", "learn_temperature", "bidirectional", "same_tower", "margin") + _WRAP_KEYS
_SIGMOID_KEYS = ("sigmoid_t", "sigmoid_b") + _WRAP_KEYS
_SCALED_KEYS = ("scale",) + _WRAP_KEYS
LOSS_KEYS: dict[str, tuple[str, ...]] = {
    "in_batch_softmax": _SOFTMAX_KEYS + ("mask_false_negatives",),
    "in_batch_softmax_sharded": _SOFTMAX_KEYS + ("mask_false_negatives",),
    "in_batch_softmax_ring": _SOFTMAX_KEYS, "sigmoid": _SIGMOID_KEYS, "sigmoid_sharded": _SIGMOID_KEYS,
    "cosent": _SCALED_KEYS, "angle": _SCALED_KEYS, "distill_kl": ("temperature", "teacher_temperature", "matryoshka_layers",
                                                             "matryoshka_layer_weights"),
    "margin_mse": _SCALED_KEYS,
}
CHOICES: dict[str, tuple[str, ...]] = {
    "loss.name": LOSS_NAMES,
    "optim.name": ("adamw", "adafactor"),
    "optim.decay": ("linear", "cosine", "constant"),
    "data.kind": ("beir", "pairs", "stsb", "files", "seqio", "tfds", "prepared"),
    "data.on_error": ("raise", "skip"),
    "data.host_order": ("per_host", "global"),
    "best_mode": ("max", "min"),
    "dtype": ("float32", "bfloat16"),
    "loss.quantization_aware": ("", "binary", "int8"),
    "param_dtype": ("float32", "bfloat16"),
    "remat_policy": ("none", "full", "dots"),      # embedjax.models.layers.REMAT_POLICIES
}
EVAL_KINDS: tuple[str, ...] = ("beir", "stsb")
# data.kind -> the data.* keys it reads beyond those every kind reads; a key another kind reads, set to a
# non-default value, is an error (it would be ignored).
_DATA_COMMON = ("kind", "query_prompt", "document_prompt", "instruction", "document_instruction", "num_negatives",
                "host_order", "one_task_per_batch")
_PREPARE_KEYS = ("prepared_dir", "rows_per_shard", "instructions", "workers")
DATA_KEYS: dict[str, tuple[str, ...]] = {
    "beir": ("path", "split", "on_error"), "pairs": ("path", "on_error"), "stsb": ("path", "on_error"),
    "files": ("sources",) + _PREPARE_KEYS,
    "seqio": ("mixture", "module", "split", "num_shards") + _PREPARE_KEYS,
    "tfds": ("tfds_name", "tfds_data_dir", "split", "fields", "num_shards") + _PREPARE_KEYS,
    "prepared": ("path", "workers"),
}
# Losses that need something of the data: scored pairs, or hard negatives with teacher scores.
_NEEDS_SCORES = {"cosent": "data.kind='stsb' (scored pairs)", "angle": "data.kind='stsb' (scored pairs)"}
_NEEDS_NEGATIVES = ("distill_kl", "margin_mse")


# LoRA's default targets: the attention projections of every encoder family (embedjax.lora)
LORA_TARGETS = r"/(query|key|value|attention_output)/kernel$"


def base_config() -> ConfigDict:
    """Every key a training config may set, with defaults. Configs start from this."""
    c = ConfigDict()
    c.seed = 0
    # model: a pretrained folder / hub id (init_from) or an architecture from scratch (model_config + tokenizer)
    c.init_from = ""                       # pretrained folder / hub id, or another run: "WORKDIR[@STEP]"
    c.model_config = ConfigDict()          # ModelConfig.to_dict() layout, used when init_from is empty
    c.tokenizer = ""                       # folder with tokenizer files (scratch models)
    c.max_query_length = 64
    c.max_document_length = 256
    # how the encoder runs in training (recorded in the run's model config; inference is always deterministic)
    c.dtype = "float32"                    # compute dtype of the encoder: float32 | bfloat16 (norms and
                                           # softmax run in float32 whatever it is)
    c.param_dtype = "float32"              # dtype parameters, gradients and optimizer state are stored in:
                                           # float32 | bfloat16 (half the memory; updates are rounded to
                                           # bfloat16, so small learning rates lose precision)
    c.dropout_rate = 0.0                   # dropout on embeddings and each residual branch, training steps only
                                           # (sentence-transformers fine-tunes BERT-family models at 0.1)
    c.remat_policy = "none"                # per-layer rematerialisation: none | full | dots
    c.scan_layers = False                  # the encoder's layers as one scanned stack: one layer compiled
                                           # instead of all (BERT family and T5; checkpoints keep the layout)
    # data
    c.data = ConfigDict()
    c.data.kind = "beir"                   # beir | pairs | stsb
    c.data.path = ""                       # folder (beir) or file (pairs / stsb)
    c.data.split = "train"
    c.data.query_prompt = ""               # a prefix ("query: ") or a template ("task: {task} | query: {text}")
    c.data.document_prompt = ""
    c.data.instruction = ""                # {task} / {instruction} of the templates in evaluation and export
                                           # (and for training sources without an instruction of their own)
    c.data.document_instruction = ""       # {instruction} of the document template (INSTRUCTOR)
    c.data.num_negatives = 0
    c.data.on_error = "raise"
    c.data.host_order = "per_host"         # per_host: each host reads its shard | global: every host reads all
                                           # data and takes its rows of one global order (host-count invariant)
    c.data.one_task_per_batch = True       # every global batch holds one task (drawn by rate, same on all hosts)
    c.data.workers = 0                     # streamed kinds: processes that read and pad the planned batches
                                           # (0: in the training process); same batches, same resume
    # streamed kinds (embedjax/data/inputs.py): prepared once into indexed shards, each host opens its own
    c.data.sources = []                    # files: [{name, files (glob, local or gs://), format, fields,
                                           #   instruction, document_instruction, rate}, ...]
    c.data.mixture = ""                    # seqio: a registered Task or Mixture
    c.data.module = ""                     # seqio: the module that registers it (imported first)
    c.data.tfds_name = ""                  # tfds: name[/config][:version]
    c.data.tfds_data_dir = ""
    c.data.fields = {}                     # tfds: our field -> the dataset's feature
    c.data.instructions = {}               # task -> instruction (tasks whose source gives none)
    c.data.num_shards = 16                 # seqio / tfds: input read in this many parts (one shard or more each)
    c.data.rows_per_shard = 200_000        # prepared shards hold at most this many examples
    c.data.prepared_dir = ""               # where the prepared shards go (default WORKDIR/prepared; a bucket on
                                           # a pod); `embedjax prepare --config` fills it ahead of time
    c.batch_size = 32                      # global
    c.num_steps = 100
    # loss
    c.loss = ConfigDict()
    c.loss.name = "in_batch_softmax"       # one of LOSS_NAMES (see embedjax/objectives.py for each)
    c.loss.temperature = 0.05
    c.loss.learn_temperature = False
    c.loss.bidirectional = True
    c.loss.same_tower = False
    c.loss.margin = 0.0
    c.loss.mask_false_negatives = False    # in-batch candidates whose text is the row's positive, or from a
                                           # duplicate query, are left out (in_batch_softmax[_sharded])
    c.loss.scale = 20.0                    # cosent / angle; margin_mse: cosine -> the teacher's score range
    c.loss.sigmoid_t = 10.0                # sigmoid / sigmoid_sharded: initial t (learned, as log t)
    c.loss.sigmoid_b = -10.0               # sigmoid / sigmoid_sharded: initial bias (learned)
    c.loss.teacher_temperature = 1.0       # distill_kl: softmax temperature of the teacher's scores
    c.loss.matryoshka_dims = ()
    c.loss.matryoshka_weights = ()
    c.loss.matryoshka_layers = ()          # 2D Matryoshka: also train the sub-networks of these many layers (each
                                           # over matryoshka_dims too), e.g. (3,) for a 6-layer model
    c.loss.matryoshka_layer_weights = ()   # one weight per entry of matryoshka_layers (default 1.0 each)
    c.loss.quantization_aware = ""         # "" | binary | int8: also train on the embeddings as stored in that
                                           # precision (straight-through), weighted by loss.quantization_weight
    c.loss.quantization_weight = 1.0
    c.loss.spread_out_weight = 0.0         # global orthogonal regulariser (dense forms), e.g. 1.0 with binary
    # optimizer
    c.optim = ConfigDict()
    c.optim.name = "adamw"
    c.optim.lr = 2e-5
    c.optim.warmup_steps = 10
    c.optim.decay = "linear"
    c.optim.end_factor = 0.0
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0
    c.optim.freeze = ""
    c.grad_cache_chunks = 0                # >1: gradient caching with this many chunks per global batch
    # LoRA (embedjax/lora.py): rank-r adapters on the Dense kernels whose path matches `targets`, the model frozen
    c.lora = ConfigDict()
    c.lora.rank = 0                        # 0: off (full fine-tuning)
    c.lora.alpha = 16.0                    # adapters scaled by alpha / rank
    c.lora.targets = LORA_TARGETS          # regex over Dense kernel paths 'tower/encoder/layer_0/query/kernel'
    # parallelism
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # evaluation / logging / checkpoints
    c.eval = ConfigDict()
    c.eval.tasks = ()                      # tuple of "kind:path[:split]" e.g. "beir:embedjax/data/shipped/scifact:test"
    c.eval.every_steps = 0                 # 0: only before and after training
    c.eval.batch_size = 128
    c.eval.before = True
    c.log_every_steps = 10
    c.checkpoint_every_steps = 0           # 0: only at the end
    c.keep_checkpoints = 3                 # the last K
    c.keep_best_checkpoints = 0            # plus the best N by best_metric (saved at eval steps)
    c.best_metric = ""                     # e.g. "beir/scifact/test/ndcg@10" (an eval metric name)
    c.best_mode = "max"
    c.export_final = True                  # write <workdir>/final as a sentence-transformers folder
    return c


def load_config(spec: str, overrides: Sequence[str] = ()) -> ConfigDict:
    """`path/to/config.py[:arg]` -> ConfigDict, with `key.sub=value` overrides applied (values parsed as Python
    literals when they parse, else kept as strings)."""
    path, _, arg = spec.partition(":")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: no such config file")
    mod_spec = importlib.util.spec_from_file_location(f"embedjax_config_{p.stem}", p)
    mod = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(mod)
    except Exception as e:
        raise ConfigError(f"{path}: failed to load ({type(e).__name__}: {e})") from e
    if not hasattr(mod, "get_config"):
        raise ConfigError(f"{path}: defines no get_config()")
    cfg = mod.get_config(arg or None)
    for o in overrides:
        apply_override(cfg, o)
    validate(cfg)
    return cfg


def parse_value(v: str) -> Any:
    try:
        return ast.literal_eval(v)
    except (ValueError, SyntaxError):
        return v


def apply_override(cfg: ConfigDict, override: str) -> None:
    key, eq, value = override.partition("=")
    if not eq:
        raise ConfigError(f"override {override!r}: expected key=value")
    key = key.strip().removeprefix("--").removeprefix("config.")
    node = cfg
    parts = key.split(".")
    for k in parts[:-1]:
        if k not in node:
            raise ConfigError(f"override {override!r}: unknown key {key!r}")
        node = node[k]
    if parts[-1] not in node:
        raise ConfigError(f"override {override!r}: unknown key {key!r}")
    old = node[parts[-1]]
    new = parse_value(value)
    if isinstance(old, float) and isinstance(new, int):
        new = float(new)
    if isinstance(old, tuple) and isinstance(new, list):
        new = tuple(new)
    try:
        node[parts[-1]] = new
    except TypeError as e:
        raise ConfigError(f"override {override!r}: {e}") from e


_FREE_FORM = ("model_config", "data.fields", "data.instructions")


def _unknown_keys(cfg: Any, ref: Any, prefix: str = "") -> list[tuple[str, list[str]]]:
    """(dotted key, the keys known at that level) for every key of `cfg` that `ref` (the base config) lacks.
    model_config is free-form here (ModelConfig.from_dict checks it), and so are data.fields / data.instructions
    (their keys are field and task names, checked when the data is read)."""
    out = []
    for k in cfg.keys():
        key = f"{prefix}{k}"
        if k not in ref:
            out.append((key, sorted(ref.keys())))
        elif key not in _FREE_FORM and isinstance(ref[k], ConfigDict):
            sub = cfg[k]
            if isinstance(sub, (ConfigDict, dict)):
                out += _unknown_keys(ConfigDict(sub) if isinstance(sub, dict) else sub, ref[k], key + ".")
    return out


def _get(cfg: ConfigDict, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def _check_data_keys(cfg: ConfigDict) -> None:
    """A data.* key that the chosen data.kind does not read, set to a non-default value, is an error."""
    base, kind = base_config().data, cfg.data.kind
    reads = set(_DATA_COMMON) | set(DATA_KEYS[kind])
    for key in sorted(cfg.data.keys()):
        if key in reads or key not in base:
            continue
        v, b = cfg.data[key], base[key]
        v = v.to_dict() if isinstance(v, ConfigDict) else _plain(v)
        b = b.to_dict() if isinstance(b, ConfigDict) else _plain(b)
        if v != b:
            raise ConfigError(f"config: data.{key} is not read by data.kind {kind!r} (it reads "
                              f"{', '.join('data.' + k for k in sorted(reads))})")
    if kind in ("files",):
        from embedjax.data.records import check_source
        from embedjax.errors import DataError

        for n, src in enumerate(cfg.data.sources):
            try:
                check_source(src.to_dict() if isinstance(src, ConfigDict) else dict(src), f"data.sources[{n}]")
            except DataError as e:
                raise ConfigError(f"config: {e}") from None
        names = [s["name"] for s in cfg.data.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"config: data.sources names a task twice: {names}")
        rated = [s["name"] for s in cfg.data.sources if s.get("rate") is not None]
        if rated and len(rated) != len(names):
            raise ConfigError(f"config: data.sources: {rated} give a rate and {sorted(set(names) - set(rated))} do "
                              "not; give every source a rate (relative weights) or none (rates by example count)")


def validate(cfg: ConfigDict) -> None:
    """Checks every key and every named choice of a config (one line naming the key and what is valid);
    nothing is written anywhere before this passes."""
    unknown = _unknown_keys(cfg, base_config())
    if unknown:
        key, known = unknown[0]
        parent = key.rpartition(".")[0]
        raise ConfigError(f"config: unknown key {key!r}; known keys{' under ' + repr(parent) if parent else ''}: "
                          f"{', '.join(known)}")
    for key, names in CHOICES.items():
        value = _get(cfg, key)
        if value not in names:
            raise ConfigError(f"config: {key} {value!r} is not one of {', '.join(names)}")
    _check_data_keys(cfg)
    for spec in cfg.eval.tasks:
        kind, _, rest = str(spec).partition(":")
        if kind not in EVAL_KINDS or not rest.partition(":")[0]:
            raise ConfigError(f"config: eval.tasks entry {spec!r}: expected KIND:PATH[:SPLIT] with KIND one of "
                              f"{', '.join(EVAL_KINDS)}")
    name = cfg.loss.name
    if name in _NEEDS_SCORES and cfg.data.kind != "stsb":
        raise ConfigError(f"config: loss.name {name!r} needs {_NEEDS_SCORES[name]}, got data.kind "
                          f"{cfg.data.kind!r}")
    if name in _NEEDS_NEGATIVES and cfg.data.num_negatives < 1:
        raise ConfigError(f"config: loss.name {name!r} distils teacher scores of each query's positive and hard "
                          "negatives: set data.num_negatives >= 1 (and data with 'scores')")
    base_loss = base_config().loss
    for key in sorted(cfg.loss.keys()):   # a loss setting the chosen loss does not read is an error
        if key != "name" and key not in LOSS_KEYS[name] and _plain(cfg.loss[key]) != _plain(base_loss[key]):
            raise ConfigError(f"config: loss.{key} is not used by loss.name {name!r} (it reads "
                              f"{', '.join('loss.' + k for k in LOSS_KEYS[name])})")
    if cfg.loss.teacher_temperature <= 0 or cfg.loss.temperature <= 0 or cfg.loss.sigmoid_t <= 0:
        raise ConfigError("config: loss.temperature, loss.teacher_temperature and loss.sigmoid_t must be > 0")
    if not cfg.init_from and not cfg.model_config:
        raise ConfigError("config: set init_from (a pretrained model) or model_config (from scratch)")
    if not cfg.init_from and "architecture" not in cfg.model_config:
        raise ConfigError("config: model_config has no architecture, so it cannot build a model from scratch; it "
                          "holds settings for a pretrained model: set init_from (a model folder or hub id)")
    if cfg.batch_size < 1 or cfg.num_steps < 0:
        raise ConfigError(f"config: batch_size must be >= 1 and num_steps >= 0 (got {cfg.batch_size}, {cfg.num_steps})")
    if cfg.grad_cache_chunks and cfg.batch_size % cfg.grad_cache_chunks:
        raise ConfigError(f"config: batch_size {cfg.batch_size} is not divisible by grad_cache_chunks "
                          f"{cfg.grad_cache_chunks}")
    if cfg.get("keep_best_checkpoints", 0) and not cfg.get("best_metric"):
        raise ConfigError("config: keep_best_checkpoints needs best_metric (an eval metric name, e.g. "
                          "'beir/scifact/test/ndcg@10')")
    if not 0.0 <= float(cfg.dropout_rate) < 1.0:
        raise ConfigError(f"config: dropout_rate must be in [0, 1), got {cfg.dropout_rate}")
    if float(cfg.loss.get("quantization_weight", 1.0)) != 1.0 and not cfg.loss.get("quantization_aware"):
        raise ConfigError("config: loss.quantization_weight is set but loss.quantization_aware is not "
                          "(binary | int8)")
    dims = tuple(cfg.loss.matryoshka_dims)
    if dims and list(dims) != sorted(dims, reverse=True):
        raise ConfigError(f"config: loss.matryoshka_dims must be decreasing, got {dims}")
    if int(cfg.lora.rank) and cfg.optim.get("freeze"):
        raise ConfigError("config: optim.freeze and lora.rank are exclusive (with LoRA the whole model is frozen "
                          "and only the adapters train)")
    layers = tuple(cfg.loss.get("matryoshka_layers", ()))
    if layers and (any(int(n) < 1 for n in layers) or list(layers) != sorted(set(layers))):
        raise ConfigError(f"config: loss.matryoshka_layers must be increasing layer counts >= 1, got {layers}")
    lw = tuple(cfg.loss.get("matryoshka_layer_weights", ()))
    if lw and len(lw) != len(layers):
        raise ConfigError(f"config: loss.matryoshka_layer_weights has {len(lw)} weights for "
                          f"{len(layers)} loss.matryoshka_layers {layers}")


def check_model_fit(cfg: ConfigDict, model_cfg: Any) -> None:
    """What the config asks of the model that only the model can answer (its depth, its layer layout)."""
    from embedjax.models.dual_encoder import num_layers

    if model_cfg.head.pooling == "latent_attention" and cfg.export_final:
        raise ConfigError("config: a latent_attention head cannot be written as a sentence-transformers folder "
                          "(export_final): set export_final=False; the checkpoints hold the model, and "
                          "`embedjax export --format saved_model` exports it")
    if int(cfg.lora.rank) and getattr(model_cfg.encoder, "scan_layers", False):
        raise ConfigError("config: lora.rank needs scan_layers=False (adapters are placed per layer)")
    layers = tuple(int(n) for n in cfg.loss.get("matryoshka_layers", ()))
    if not layers:
        return
    n = num_layers(model_cfg)
    if layers[-1] >= n:
        raise ConfigError(f"config: loss.matryoshka_layers {layers} must be below the model's {n} layers (the "
                          "full depth is always trained)")
    if getattr(model_cfg.encoder, "scan_layers", False):
        raise ConfigError("config: loss.matryoshka_layers (2D Matryoshka) needs scan_layers=False: a scanned "
                          "layer stack returns only its last state")


def read_workdir_config(workdir: Any) -> ConfigDict:
    """The experiment config a training run wrote to ``<workdir>/config.json``, over today's defaults."""
    if "://" in str(workdir):
        from etils import epath
        path = epath.Path(str(workdir)) / "config.json"
    else:
        path = Path(workdir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (not a training workdir)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    cfg = base_config()
    _merge(cfg, raw)
    return cfg


def _merge(cfg: Any, raw: dict) -> None:
    """Overlays a config.json dict on the base config (nested ConfigDicts kept; lists become tuples)."""
    for k, v in raw.items():
        if isinstance(v, dict) and k in cfg and isinstance(cfg[k], ConfigDict) and k != "model_config":
            _merge(cfg[k], v)
        elif isinstance(v, dict):
            cfg[k] = ConfigDict(v)
        elif isinstance(v, list):
            cfg[k] = tuple(v)
        else:
            try:
                cfg[k] = v
            except TypeError:  # a field whose type changed (e.g. None default): replace
                del cfg[k]
                cfg[k] = v


