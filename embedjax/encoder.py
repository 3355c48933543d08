"""`Encoder`: a loaded embedding model (config + params + tokenizer) with a fast, bucketed `encode`."""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from embedjax.data.prompts import Prompt, prompt_from_st, st_prompts
from embedjax import quantize as qz
from embedjax.models.convert import ModelLoadError, load_folder, resolve_model_dir, save_sentence_transformers
from embedjax.models.dual_encoder import DualEncoder, ModelConfig, Tower
from embedjax.tokenize import TextTokenizer, bucket_for, bucket_lengths, load_tokenizer

log = logging.getLogger(__name__)

PROGRESS_MIN_TEXTS = 1024  # show a progress bar from this many texts on (show_progress=None)


class Encoder:
    """A sentence-embedding model applied as a pure function of its params.

    >>> enc = Encoder.load("sentence-transformers/all-MiniLM-L6-v2")   # or a local folder
    >>> enc.encode(["a sentence", "another"]).shape
    (2, 384)
    """

    def __init__(self, config: ModelConfig, params: dict, tokenizer: Any, *, name: str = "",
                 prompts: dict[str, str] | None = None, hf_config: dict | None = None, mesh: Any = None,
                 prompt: Prompt | None = None, default_prompt_name: str | None = None):
        """`prompts`: sentence-transformers prompts (name -> prefix, for `encode(prompt_name=...)`).
        `prompt`: the query / document templates the model was trained with (`embedjax.data.prompts`, the one
        prompt language), applied by `encode_queries` / `encode_documents`; default: read from the "query" /
        "document" entries of `prompts`. `mesh`: when the params live on a device mesh (e.g. during training),
        batches are sharded over its data axes so encoding is data parallel instead of replicated.
        `default_prompt_name` (sentence-transformers' key of that name): the entry of `prompts` that `encode`
        applies when given no prompt, and that queries and documents get when `prompts` has no "query" /
        "document" entry, as sentence-transformers does."""
        import jax

        self.config = config
        self.params = jax.tree.map(jax.numpy.asarray, params)
        self.tokenizer = tokenizer
        self.name = name
        self.prompts = dict(prompts or {})
        if default_prompt_name is not None and default_prompt_name not in self.prompts:
            raise ValueError(f"default_prompt_name {default_prompt_name!r} is not one of the prompts "
                             f"{sorted(self.prompts)}")
        self.default_prompt_name = default_prompt_name
        if prompt is None:
            roles = dict(self.prompts)
            if default_prompt_name is not None:
                for role in ("query", "document"):
                    roles.setdefault(role, self.prompts[default_prompt_name])
            prompt = prompt_from_st(roles)
        self.prompt = prompt
        # int8 / uint8 calibration: output dim -> [2, dim] per-dimension (min, max); see `calibrate`
        self.quantization_ranges: dict[int, np.ndarray] = {}
        # whitening (`fit_whitening`): (mean [D], matrix [D, k]) applied to every output, or None
        self.whitening: tuple[np.ndarray, np.ndarray] | None = None
        self._hf_config = hf_config
        self._text = TextTokenizer(tokenizer, config.max_length)
        self._module = DualEncoder(config)
        self._compiled: set[tuple] = set()
        self.mesh = mesh
        out_sharding = None
        if mesh is not None and not all(d.process_index == jax.process_index() for d in mesh.devices.flat):
            # a mesh over several processes (evaluation during multi-host training): every process feeds the
            # same texts and reads back all embeddings, so the output is gathered (replicated)
            out_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        from embedjax.models.layers import compiler_options
        self._apply = jax.jit(self._forward, static_argnames=("tower", "normalize"), out_shardings=out_sharding,
                              compiler_options=compiler_options(None if mesh is None else mesh.devices.flat))

    # --------------------------------------------------------------------------------------- construction
    @classmethod
    def load(cls, path_or_id: str | os.PathLike, *, max_length: int | None = None) -> "Encoder":
        """Loads a local sentence-transformers / Hugging Face folder, or a hub id (needs network)."""
        cfg, params, tdir, extras = load_folder(path_or_id)
        if max_length is not None:
            cfg = _replace(cfg, max_length=max_length)
        tok = load_tokenizer(tdir)
        if len(tok) > _vocab_size(cfg):
            raise ModelLoadError(f"{tdir}: tokenizer has {len(tok)} tokens but the model's vocabulary has "
                                 f"{_vocab_size(cfg)}: they do not belong together")
        hf_config = json.loads((tdir / "config.json").read_text(encoding="utf-8"))
        default = extras.get("default_prompt_name")
        if default is not None and default not in (extras.get("prompts") or {}):
            raise ModelLoadError(f"{path_or_id}/config_sentence_transformers.json: default_prompt_name {default!r} "
                                 f"is not one of its prompts {sorted(extras.get('prompts') or {})}")
        enc = cls(cfg, params, tok, name=str(path_or_id), prompts=extras.get("prompts"), hf_config=hf_config,
                  default_prompt_name=default)
        folder = resolve_model_dir(path_or_id)
        enc.whitening = read_whitening(folder, enc.dim)
        enc.quantization_ranges = read_quantization_ranges(folder, enc.output_dim)
        return enc

    def save(self, path: str | os.PathLike) -> Path:
        """Writes a sentence-transformers folder (safetensors) that `SentenceTransformer(path)` loads. The
        training prompt goes into its ``prompts`` as "query" / "document" where it has a prefix form. int8
        calibration ranges (`calibrate`) go into ``quantization_ranges.json``, which `load` reads back."""
        out = save_sentence_transformers(path, self.config, self.params, self.tokenizer,
                                         prompts=st_prompts(self.prompt, self.prompts), hf_config=self._hf_config,
                                         default_prompt_name=self.default_prompt_name)
        self._save_extras(out)
        return out

    # --------------------------------------------------------------------------------------- properties
    @property
    def max_length(self) -> int:
        return self.config.max_length

    @property
    def dim(self) -> int:
        return self.config.embedding_dim

    @property
    def num_compilations(self) -> int:
        """Distinct (batch, length, tower, normalize) shapes compiled so far by `encode`."""
        return len(self._compiled)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Stable hash of config and weights, for cache keys."""
        import jax

        from embedjax.models.layers import RUNTIME_FIELDS

        cfg = self.config.to_dict()   # dropout and rematerialisation never change what the model computes here
        cfg["encoder"] = {k: v for k, v in cfg["encoder"].items() if k not in RUNTIME_FIELDS}
        h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
        for path, leaf in jax.tree_util.tree_flatten_with_path(self.params)[0]:
            h.update(jax.tree_util.keystr(path).encode())
            h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
        if self.whitening is not None:   # whitened outputs are other embeddings (cache keys differ)
            h.update(b"whitening")
            for a in self.whitening:
                h.update(np.ascontiguousarray(a, np.float32).tobytes())
        return h.hexdigest()[:16]

    # --------------------------------------------------------------------------------------- encoding
    def _forward(self, params, ids_BxL, mask_BxL, *, tower: Tower, normalize: bool):
        return self._module.apply({"params": params}, ids_BxL, mask_BxL, tower=tower, normalize=normalize)

    def encode(self, texts: str | Iterable[str], *, batch_size: int = 128, max_length: int | None = None,
               prompt: str | None = None, prompt_name: str | None = None, normalize: bool | None = None,
               dim: int | None = None, tower: Tower = "query", show_progress: bool | None = None,
               warn_truncation: bool = True, precision: str = "float32", layers: int | None = None) -> np.ndarray:
        """Embeds texts; returns float32 [N, D] (D = `dim` if given).

        `layers` (2D Matryoshka): embed with the sub-network of the model's first `layers` layers only
        (`truncated(layers)`, compiled once and kept); `dim` and `precision` then apply to its embeddings.

        Texts are sorted by token length and padded to bucket lengths, so at most one compilation per bucket
        (per tower / normalisation) happens whatever the input. `dim` keeps the first `dim` components
        (Matryoshka) and re-normalises when the output is normalised. `prompt` is prepended to every text;
        `prompt_name` picks one of the model's configured prompts. Truncated texts are counted in a warning
        (`warn_truncation=False`: at debug level; callers that encode in pieces warn once).
        """
        if layers is not None and int(layers) != self.num_layers:
            if self.whitening is not None:
                raise ValueError("encode(layers=...): the whitening was fitted on the full model's embeddings; "
                                 "use truncated(layers) and fit that one's own")
            return self.truncated(int(layers)).encode(
                texts, batch_size=batch_size, max_length=max_length, prompt=prompt, prompt_name=prompt_name,
                normalize=normalize, dim=dim, tower=tower, show_progress=show_progress,
                warn_truncation=warn_truncation, precision=precision)
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                raise ValueError(f"unknown prompt_name {prompt_name!r}; this model has {sorted(self.prompts)}")
            prompt = self.prompts[prompt_name]
        elif prompt is None and self.default_prompt_name is not None:
            prompt = self.prompts[self.default_prompt_name]
        max_len = int(max_length or self.config.max_length)
        if max_len > self.config.max_length and self.config.architecture == "bert":
            raise ValueError(f"max_length {max_len} exceeds the model's {self.config.max_length}")
        full_dim = self.output_dim
        out_dim = full_dim if dim is None else int(dim)
        if not 1 <= out_dim <= full_dim:
            raise ValueError(f"dim must be in [1, {full_dim}], got {dim}")
        norm = self.config.head.normalize if normalize is None else bool(normalize)
        if not texts:
            empty = np.zeros((0, out_dim), np.float32)
            return empty if precision == "float32" else self._quantize(empty, precision)
        if prompt:
            texts = [prompt + t for t in texts]

        tok = self._text.tokenize(texts, max_len)
        self.last_num_truncated = tok.num_truncated
        if tok.num_truncated:
            log.log(logging.WARNING if warn_truncation else logging.DEBUG,
                    "%d of %d texts were longer than %d tokens and were truncated", tok.num_truncated, len(texts),
                    max_len)
        lengths = np.fromiter((len(x) for x in tok.ids), np.int64, len(tok.ids))
        order = np.argsort(-lengths, kind="stable")
        buckets = bucket_lengths(max_len)
        # One batch size per call (the next power of two >= N, capped), so small inputs stay cheap.
        rows = min(batch_size, 1 << max(0, (len(texts) - 1).bit_length()))
        in_sharding = None
        if self.mesh is not None:
            from embedjax import sharding
            dp = sharding.data_parallel_size(self.mesh)
            rows = -(-rows // dp) * dp
            in_sharding = sharding.batch_sharding(self.mesh)
        out = np.empty((len(texts), self.dim), np.float32)
        pending: list[tuple[np.ndarray, Any]] = []
        starts = range(0, len(texts), rows)
        show = len(texts) >= PROGRESS_MIN_TEXTS if show_progress is None else show_progress
        if show:
            from embedjax.progress import track
            starts = track(starts, "encode", "batch")
        for s in starts:
            idx = order[s:s + rows]
            length = bucket_for(int(lengths[idx[0]]), buckets)
            ids, mask = self._text.pad([tok.ids[i] for i in idx], length, rows)
            if in_sharding is not None:
                import jax
                ids, mask = jax.device_put(ids, in_sharding), jax.device_put(mask, in_sharding)
            self._compiled.add((rows, length, tower, norm))
            pending.append((idx, self._apply(self.params, ids, mask, tower=tower, normalize=norm)))
            if len(pending) > 2:  # keep a few batches in flight, bound device memory
                i0, e0 = pending.pop(0)
                out[i0] = np.asarray(e0)[: len(i0)]
        for i0, e0 in pending:
            out[i0] = np.asarray(e0)[: len(i0)]
        if self.whitening is not None:
            out = qz.apply_whitening(out, *self.whitening, normalize=norm)
        out = _truncate(out, out_dim, norm)
        return self._quantize(out, precision) if precision != "float32" else out

    @property
    def num_layers(self) -> int:
        from embedjax.models.dual_encoder import num_layers
        return num_layers(self.config)

    def truncated(self, layers: int) -> "Encoder":
        """The sub-network of the first `layers` encoder layers (2D Matryoshka) as an Encoder of its own: same
        tokenizer, prompts and head, a subset of the same parameters (nothing copied). Kept per `layers`, so
        `encode(layers=...)` compiles it once. It can be saved, calibrated, evaluated and exported like any
        model; it has no whitening (fit its own)."""
        from embedjax.models.dual_encoder import truncate_layers

        if int(layers) == self.num_layers:
            return self
        subs = self.__dict__.setdefault("_truncated", {})
        if int(layers) not in subs:
            cfg, params = truncate_layers(self.config, self.params, int(layers))
            sub = Encoder(cfg, params, self.tokenizer, name=f"{self.name}[:{int(layers)} layers]",
                          prompts=self.prompts, hf_config=_truncated_hf_config(self._hf_config, cfg),
                          mesh=self.mesh, prompt=self.prompt, default_prompt_name=self.default_prompt_name)
            subs[int(layers)] = sub
        return subs[int(layers)]

    @property
    def output_dim(self) -> int:
        """The dimension `encode` returns by default: the model's, or the whitening's when it cuts dimensions."""
        return self.dim if self.whitening is None else int(self.whitening[1].shape[1])

    def fit_whitening(self, texts: Sequence[str], *, dim: int | None = None, tower: Tower = "query",
                      **kw: Any) -> tuple[np.ndarray, np.ndarray]:
        """Fits whitening (`embedjax.quantize.fit_whitening`: mean and whitening matrix, `dim` keeping the
        leading principal directions) on the embeddings of a sample of texts; from then on every output of
        `encode` (so evaluation and cache keys too) is whitened, re-normalised when the model normalises. Saved
        with the model (`whitening.npz`). Fit on training text only, never on what is evaluated."""
        self.whitening = None
        self.__dict__.pop("fingerprint", None)
        mu, w = qz.fit_whitening(self.encode(list(texts), tower=tower, **kw), dim=dim)
        self.whitening = (mu, w)
        self.__dict__.pop("fingerprint", None)
        self.quantization_ranges = {}   # ranges of the un-whitened outputs no longer apply
        return mu, w

    def _quantize(self, emb: np.ndarray, precision: str) -> np.ndarray:
        qz.check_precision(precision)
        ranges = None
        if precision in qz.SCALAR:
            ranges = self.quantization_ranges.get(emb.shape[1])
            if ranges is None:
                raise ValueError(f"{precision} output at dim {emb.shape[1]} needs calibration ranges: call "
                                 f"Encoder.calibrate(sample_texts, dims=[{emb.shape[1]}]) first (this model has "
                                 f"them for dims {sorted(self.quantization_ranges) or 'none'})")
        return qz.quantize(emb, precision, ranges)

    def calibrate(self, texts: Sequence[str], *, dims: Sequence[int] | None = None, tower: Tower = "document",
                  **kw: Any) -> dict[int, np.ndarray]:
        """int8 / uint8 calibration ranges (each dimension's min and max) from a sample of texts (a few thousand
        documents of the corpus the index will hold), for each output dim in `dims` (default: the full one).
        Kept with the model (`encode(precision="int8")`, `save`, the SavedModel) and returned."""
        emb = self.encode(list(texts), tower=tower, **kw)
        norm = self.config.head.normalize if kw.get("normalize") is None else bool(kw["normalize"])
        for d in (dims or [self.output_dim]):
            if not 1 <= int(d) <= self.output_dim:
                raise ValueError(f"dim must be in [1, {self.output_dim}], got {d}")
            self.quantization_ranges[int(d)] = qz.calibration_ranges(_truncate(emb, int(d), norm))
        return dict(self.quantization_ranges)

    def _save_extras(self, folder: Path) -> None:
        if self.whitening is not None:
            np.savez(folder / WHITENING_FILE, mean=self.whitening[0], matrix=self.whitening[1])
        if self.quantization_ranges:
            (folder / QUANTIZATION_FILE).write_text(json.dumps(
                {"format": "per-dimension [min, max] for int8 / uint8 (embedjax.quantize)",
                 "ranges": {str(d): r.tolist() for d, r in sorted(self.quantization_ranges.items())}}) + "\n")

    def format_texts(self, texts: Sequence[str], role: str, titles: Sequence[str] | None = None) -> list[str]:
        """The strings `encode_queries` / `encode_documents` embed: the model's prompt applied (as in training,
        evaluation and the SavedModel's signatures); the texts unchanged when the model has no prompt."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if self.prompt is None:
            if role == "document" and titles is not None:
                return [(ti + " " + t).strip() for t, ti in zip(texts, titles)]
            return texts
        return self.prompt.format(role, texts, None if titles is None else list(titles))

    def encode_queries(self, texts: str | Iterable[str], **kw: Any) -> np.ndarray:
        """`encode` of queries: the model's query prompt applied, the query tower."""
        if "prompt" in kw or "prompt_name" in kw:
            raise TypeError("encode_queries applies the model's own prompt; use encode(prompt=...) for another")
        return self.encode(self.format_texts(texts, "query"), tower="query", prompt="", **kw)

    def encode_documents(self, texts: str | Iterable[str], titles: Sequence[str] | None = None,
                         **kw: Any) -> np.ndarray:
        """`encode` of documents (with optional titles): the model's document prompt, the document tower."""
        if "prompt" in kw or "prompt_name" in kw:
            raise TypeError("encode_documents applies the model's own prompt; use encode(prompt=...) for another")
        return self.encode(self.format_texts(texts, "document", titles), tower="document", prompt="", **kw)

    def __repr__(self) -> str:
        c = self.config
        return (f"Encoder({self.name or '<unnamed>'}: {c.architecture}, dim={self.dim}, pooling={c.head.pooling}, "
                f"normalize={c.head.normalize}, max_length={c.max_length})")


def _truncated_hf_config(hf_config: dict | None, cfg: ModelConfig) -> dict | None:
    """The Hugging Face config.json of a truncated model: the layer count (and ModernBERT's layer types)."""
    if hf_config is None:
        return None
    out = dict(hf_config)
    for key in ("num_hidden_layers", "num_layers"):
        if key in out:
            out[key] = getattr(cfg.encoder, key, None) or getattr(cfg.encoder, "num_layers")
    if "layer_types" in out and hasattr(cfg.encoder, "layer_types"):
        out["layer_types"] = list(cfg.encoder.layer_types)
    return out


def _vocab_size(cfg: ModelConfig) -> int:
    return cfg.encoder.vocab_size


def _replace(cfg: ModelConfig, **kw: Any) -> ModelConfig:
    import dataclasses
    return dataclasses.replace(cfg, **kw)


def read_texts(path: str | os.PathLike, field: str = "text") -> list[str]:
    """Reads `.txt` (one text a line) or `.jsonl` (a `field` string per line); errors name file and line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    texts: list[str] = []
    with open(p, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{p}:{n}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
            line = line.rstrip("\r\n")
            if p.suffix == ".jsonl":
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or field not in obj:
                    raise ValueError(f"{p}:{n}: missing field {field!r}")
                if not isinstance(obj[field], str):
                    raise ValueError(f"{p}:{n}: field {field!r} is {type(obj[field]).__name__}, expected a string")
                texts.append(obj[field])
            else:
                texts.append(line)
    return texts


def batched(seq: Sequence[Any], n: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


QUANTIZATION_FILE = "quantization_ranges.json"
WHITENING_FILE = "whitening.npz"


def read_whitening(folder: Path, dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The whitening a model folder keeps (`Encoder.save`); None when it has none."""
    path = Path(folder) / WHITENING_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            mu, w = np.asarray(z["mean"], np.float32), np.asarray(z["matrix"], np.float32)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{path}: not a whitening file ({e})") from None
    if mu.shape != (dim,) or w.ndim != 2 or w.shape[0] != dim or not 1 <= w.shape[1] <= dim:
        raise ModelLoadError(f"{path}: mean {mu.shape} / matrix {w.shape} do not fit the model's dimension {dim}")
    return mu, w


def read_quantization_ranges(folder: Path, full_dim: int) -> dict[int, np.ndarray]:
    """The int8 calibration ranges a model folder keeps (`Encoder.save`); {} when it has none."""
    path = Path(folder) / QUANTIZATION_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))["ranges"]
        out = {int(d): np.asarray(r, np.float32) for d, r in raw.items()}
    except (ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{path}: not a quantization ranges file ({e})") from None
    for d, r in out.items():
        if r.shape != (2, d) or not 1 <= d <= full_dim:
            raise ModelLoadError(f"{path}: ranges for dim {d} have shape {r.shape}, expected (2, {d}) with "
                                 f"dim <= {full_dim}")
    return out


def _truncate(emb: np.ndarray, dim: int, normalize: bool) -> np.ndarray:
    """The first `dim` components (Matryoshka), re-normalised when the model's output is normalised."""
    if dim >= emb.shape[1]:
        return emb
    out = emb[:, :dim]
    if normalize:
        out = out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return np.ascontiguousarray(out, dtype=np.float32)
