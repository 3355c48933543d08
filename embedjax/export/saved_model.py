"""TF SavedModel export for TF Serving: raw strings in, embeddings out (the t5x way, `t5x/export_lib.py`).

    export_saved_model("sentence-transformers/all-MiniLM-L6-v2", "/models/minilm/1")
    export_saved_model("/runs/tiny", "/models/tiny/3", platforms=("cpu", "cuda"))   # a training workdir

What the SavedModel holds:

* **Parameters as `tf.Variable`s** (one per leaf of the Flax tree, under ``variables/``), passed as arguments
  to the model, so the graph stays small and a model above 2 GB exports fine.
* **The tokenizer inside the graph**: `embedjax.data.tf_tokenize.TFTokenizer` (WordPiece through
  tensorflow_text for BERT-family models, SentencePiece for T5), i.e. the ids training used; at export the
  in-graph ids are checked against the model's Hugging Face tokenizer on probe texts.
* **The model through jax2tf with native serialization** (StableHLO in an ``XlaCallModule`` op) for each
  platform of `platforms` ("cpu", "cuda", "rocm", "tpu"); TF Serving needs
  ``--xla_cpu_compilation_enabled=true`` to run it on CPU.
* **Polymorphic batch, bucketed length**: texts are truncated to the model's maximum length and the batch is
  padded to the smallest of `embedjax.tokenize.bucket_lengths(max_length)` holding its longest text; a
  ``tf.switch_case`` picks one converted function per bucket (static length, symbolic batch ``b``). Why not
  one symbolic length dimension: the T5 encoder computes its relative-position buckets in numpy from the
  static length (`embedjax.models.t5.relative_position_buckets`), which cannot trace a symbolic length;
  per-bucket functions work for every architecture, and XLA compiles once per concrete (batch, length) shape
  either way, so the buckets bound the number of compilations just the same.
* **Signatures** (input ``text``: ``tf.string [-1]``):
  ``serving_default`` -> ``embedding`` float32 [B, D] (L2-normalised when the model is) and ``embedding_{d}``
  for each Matryoshka dim d (first d components, re-normalised when the model normalises; as
  ``Encoder.encode(dim=d)``); ``query`` / ``document`` (same outputs, with the role's prompt and tower) when
  the model has prompts or separate towers; ``tokenize`` -> ``input_ids`` / ``attention_mask`` int32
  [B, bucket].
* ``assets.extra/tf_serving_warmup_requests``: PredictionLog records (one per signature x length bucket x
  batch size) that make TF Serving compile every shape before it takes traffic;
  ``assets.extra/batching_parameters.txt``: an example for ``--enable_batching``;
  ``assets.extra/embedjax_export.json``: what was exported.

Bad input: invalid UTF-8 bytes are replaced by U+FFFD (as ``bytes.decode("utf-8", "replace")``) before
tokenisation; an empty batch returns a [0, D] array; empty and very long strings are embedded (the latter
truncated); a string tensor of another shape (TF Serving does not check shapes) is read row-major as a batch
(a scalar gives [1, D]); a non-string input is rejected by the signature with TF's InvalidArgument error.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from embedjax.export.source import ExportError, ExportSource, RolePrompt, format_text, load_source
from embedjax.tokenize import bucket_lengths

log = logging.getLogger(__name__)

SUPPORTED_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
INPUT_NAME = "text"
OUTPUT_NAME = "embedding"
WARMUP_FILE = "tf_serving_warmup_requests"
BATCHING_FILE = "batching_parameters.txt"
METADATA_FILE = "embedjax_export.json"
MAX_WARMUP_RECORDS = 1000  # TF Serving reads at most this many warmup records
FROM_MODEL: Any = type("FromModel", (), {"__repr__": lambda self: "FROM_MODEL"})()  # default: the model's own


@dataclasses.dataclass(frozen=True)
class BatchingParameters:
    """TF Serving's ``BatchingParameters`` (session_bundle_config.proto), written as a text proto for
    ``--enable_batching --batching_parameters_file=...``. Sizes are in texts per batch."""

    max_batch_size: int = 128
    batch_timeout_micros: int = 2000
    max_enqueued_batches: int = 64
    num_batch_threads: int = 4
    allowed_batch_sizes: tuple[int, ...] = (1, 8, 32, 128)

    def __post_init__(self) -> None:
        sizes = tuple(int(s) for s in self.allowed_batch_sizes)
        if any(s < 1 for s in sizes) or list(sizes) != sorted(set(sizes)):
            raise ValueError(f"allowed_batch_sizes must be increasing positive ints, got {sizes}")
        if sizes and sizes[-1] != self.max_batch_size:
            raise ValueError(f"the last allowed batch size ({sizes[-1]}) must equal max_batch_size "
                             f"({self.max_batch_size}), as TF Serving requires")
        for f in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads"):
            if int(getattr(self, f)) < (0 if f == "batch_timeout_micros" else 1):
                raise ValueError(f"{f} must be positive, got {getattr(self, f)}")

    def to_text_proto(self) -> str:
        lines = [
            "# TF Serving batching parameters (text proto of tensorflow.serving.BatchingParameters), for",
            "#   tensorflow_model_server --enable_batching --batching_parameters_file=<this file>",
            "# Every batch is padded up to one of allowed_batch_sizes; the SavedModel's warmup requests",
            "# compile exactly these sizes. Tune num_batch_threads to the serving machine's cores.",
            f"max_batch_size {{ value: {self.max_batch_size} }}",
            f"batch_timeout_micros {{ value: {self.batch_timeout_micros} }}",
            f"max_enqueued_batches {{ value: {self.max_enqueued_batches} }}",
            f"num_batch_threads {{ value: {self.num_batch_threads} }}",
        ]
        lines += [f"allowed_batch_sizes: {s}" for s in self.allowed_batch_sizes]
        lines.append("pad_variable_length_inputs: false")
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- the tf.Module
def _format_tf(prompt: RolePrompt, role: str, texts: Any) -> Any:
    """The in-graph prompt: a prefix (as `Encoder.encode(prompt=...)`) or a training `Prompt` template."""
    import tensorflow as tf

    if prompt is None or prompt == "":
        return texts
    if isinstance(prompt, str):
        return tf.strings.join([tf.fill(tf.shape(texts), prompt), texts])
    return prompt.format_query_tf(texts) if role == "query" else prompt.format_document_tf(texts)


def _tf_quantize(x: Any, precision: str, ranges: np.ndarray | None) -> Any:
    """`embedjax.quantize.quantize` in TensorFlow, the same float32 arithmetic (so equal inputs give equal
    codes): int8 / uint8 with the calibration ranges as constants, binary / ubinary packed big-endian."""
    import tensorflow as tf

    from embedjax.quantize import _steps

    if precision in ("int8", "uint8"):
        starts, steps = _steps(ranges)   # steps are never 0
        # not `a / tf.constant(steps)`: in a graph, Grappler rewrites a division by a constant into a product with
        # its reciprocal, which rounds differently (about 1 code in 650 off by one); divide_no_nan is left alone
        q = tf.clip_by_value(tf.floor(tf.math.divide_no_nan(x - tf.constant(starts), tf.constant(steps))), 0.0, 255.0)
        return tf.cast(q, tf.uint8) if precision == "uint8" else tf.cast(q - 128.0, tf.int8)
    d = int(x.shape[-1])
    bits = tf.cast(x > 0, tf.int32)
    if d % 8:
        bits = tf.pad(bits, [[0, 0], [0, 8 - d % 8]])
    weights = tf.constant([128, 64, 32, 16, 8, 4, 2, 1], tf.int32)
    packed = tf.reduce_sum(tf.reshape(bits, [-1, (d + 7) // 8, 8]) * weights, axis=-1)
    return tf.cast(packed, tf.uint8) if precision == "ubinary" else tf.cast(packed - 128, tf.int8)


def output_names(dims: Sequence[int], full_dim: int, precisions: Sequence[str], scalar: bool = True) -> list[str]:
    """The outputs of an embedding signature: ``embedding`` and ``embedding_{d}`` (float32), each also as
    ``..._{precision}`` codes; `scalar=False` (a 2D Matryoshka sub-network: no calibration ranges of its own)
    leaves out int8 / uint8."""
    out = []
    for d in [None, *dims]:
        base = OUTPUT_NAME if d is None else f"{OUTPUT_NAME}_{d}"
        out.append(base)
        out += [f"{base}_{p}" for p in precisions if scalar or p not in ("int8", "uint8")]
    return out


def _make_module(src: ExportSource, tokenizer: Any, *, max_length: int, platforms: Sequence[str],
                 matryoshka_dims: Sequence[int], roles: dict[str, tuple[str, RolePrompt, int | None]],
                 precisions: Sequence[str] = (), layers: Sequence[int] = ()) -> Any:
    """The tf.Module to save (built here so TensorFlow is imported only when exporting)."""
    import flax.traverse_util
    import tensorflow as tf
    from jax.experimental import jax2tf

    from embedjax.models.dual_encoder import DualEncoder, truncate_layers

    cfg = src.config
    buckets = bucket_lengths(max_length)
    dim = cfg.embedding_dim
    normalize = bool(cfg.head.normalize)
    towers = ("query",) if cfg.shared_towers else ("query", "document")
    pad_id = int(tokenizer.spec.pad_id)
    whitening = src.whitening
    out_dim = dim if whitening is None else int(whitening[1].shape[1])
    # the full model (None) and each 2D Matryoshka sub-network: (config, the params it reads)
    models = {None: (cfg, lambda p: p)}
    for n in layers:
        models[n] = (truncate_layers(cfg, src.params, n)[0], lambda p, n=n: truncate_layers(cfg, p, n)[1])

    def apply(params, ids_BxL, mask_BxL, *, tower: str, model: Any):
        return model.apply({"params": params}, ids_BxL, mask_BxL, tower=tower, normalize=False)

    class EmbeddingModule(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="embedjax")
            flat = flax.traverse_util.flatten_dict(src.params)
            var_of = {k: tf.Variable(np.asarray(v), trainable=False, name="__".join(map(str, k)))
                      for k, v in flat.items()}
            self.param_variables = list(var_of.values())     # tracked: saved under variables/
            self._params = flax.traverse_util.unflatten_dict(var_of)
            self.tokenizer = tokenizer                         # tracked: TF tokenizer resources
            self.buckets = tuple(buckets)
            self.model_fns: dict[str, Any] = {}  # "{tower}_{length}" ("L{n}_..." for n layers) -> tf.function
            for n, (sub_cfg, select) in models.items():
                module = DualEncoder(sub_cfg)
                for tower in towers:
                    for length in buckets:
                        conv = jax2tf.convert(functools.partial(apply, tower=tower, model=module),
                                              polymorphic_shapes=[None, f"(b, {length})", f"(b, {length})"],
                                              with_gradient=False,
                                              native_serialization_platforms=tuple(platforms))
                        self.model_fns[_fn_key(n, tower, length)] = self._model_fn(conv, length, select)

        def _model_fn(self, conv: Callable, length: int, select: Callable) -> Any:
            spec = tf.TensorSpec([None, length], tf.int32)

            def run(ids, mask):
                return conv(select(self._params), ids, mask)
            return tf.function(run, input_signature=[spec, spec], autograph=False, jit_compile=True)

        # -- pieces shared by the signatures
        def _clean(self, texts: Any) -> Any:
            texts = tf.reshape(texts, [-1])  # TF Serving does not check shapes: any shape is read row-major
            return tf.strings.unicode_transcode(texts, "UTF-8", "UTF-8", errors="replace",
                                                replacement_char=0xFFFD)

        def _bucket_index(self, ids: Any) -> Any:
            longest = tf.maximum(tf.reduce_max(ids.row_lengths()), 1)
            buckets_t = tf.constant(self.buckets, tf.int64)
            idx = tf.searchsorted(buckets_t, tf.reshape(longest, [1]), side="left")[0]
            return tf.cast(tf.minimum(idx, len(self.buckets) - 1), tf.int32)

        def embed(self, texts: Any, tower: str, prompt: RolePrompt, role: str,
                  n_layers: int | None = None) -> dict[str, Any]:
            ids = self.tokenizer.tokenize(_format_tf(prompt, role, self._clean(texts)))  # [B, (L)] truncated
            lengths = ids.row_lengths()
            tower_key = tower if not cfg.shared_towers else "query"

            def branch(length: int) -> Callable[[], Any]:
                def run():
                    dense = ids.to_tensor(default_value=pad_id, shape=[None, length])
                    mask = tf.sequence_mask(lengths, length, dtype=tf.int32)
                    return self.model_fns[_fn_key(n_layers, tower_key, length)](dense, mask)
                return run

            def nonempty():
                return tf.switch_case(self._bucket_index(ids), [branch(b) for b in self.buckets])

            emb = tf.cond(tf.size(ids.row_lengths()) > 0, nonempty, lambda: tf.zeros([0, dim], tf.float32))
            emb = tf.ensure_shape(tf.cast(emb, tf.float32), [None, dim])
            full = _l2_normalize(emb) if normalize else emb
            if whitening is not None and n_layers is None:   # as Encoder.encode: whitened, then re-normalised
                full = tf.matmul(full - tf.constant(whitening[0]), tf.constant(whitening[1]))
                full = _l2_normalize(full) if normalize else full
            out = {OUTPUT_NAME: full}
            for d in matryoshka_dims:
                part = full[:, :d]
                out[f"{OUTPUT_NAME}_{d}"] = _l2_normalize(part) if normalize else part
            for name in list(out):
                d = int(out[name].shape[-1]) if name != OUTPUT_NAME else out_dim
                for p in precisions:
                    if p in ("int8", "uint8") and n_layers is not None:
                        continue   # calibration ranges are the full model's (see output_names)
                    out[f"{name}_{p}"] = _tf_quantize(out[name], p, src.quantization_ranges.get(d))
            return out

        def tokenize_padded(self, texts: Any) -> dict[str, Any]:
            ids = self.tokenizer.tokenize(self._clean(texts))
            length = tf.gather(tf.constant(self.buckets, tf.int64), self._bucket_index(ids))
            dense = ids.to_tensor(default_value=pad_id)
            dense = tf.pad(dense, [[0, 0], [0, length - tf.cast(tf.shape(dense)[1], tf.int64)]],
                           constant_values=pad_id)
            mask = tf.sequence_mask(ids.row_lengths(), length, dtype=tf.int32)
            return {"input_ids": tf.cast(dense, tf.int32), "attention_mask": mask}

    def _l2_normalize(x):
        return x / tf.maximum(tf.norm(x, axis=-1, keepdims=True), 1e-12)

    module = EmbeddingModule()
    text_spec = tf.TensorSpec([None], tf.string, name=INPUT_NAME)
    signatures: dict[str, Any] = {}

    def signature(tower: str, prompt: RolePrompt, role: str, n_layers: int | None) -> Any:
        def serve(text):
            return module.embed(text, tower, prompt, role, n_layers)
        return tf.function(serve, input_signature=[text_spec], autograph=False)

    for name, (role, prompt, n_layers) in roles.items():
        fn = signature(_signature_tower(name, role), prompt, role, n_layers)
        setattr(module, f"sig_{name}", fn)
        signatures[name] = fn

    def tokenize(text):
        return module.tokenize_padded(text)

    module.sig_tokenize = tf.function(tokenize, input_signature=[text_spec], autograph=False)
    signatures["tokenize"] = module.sig_tokenize
    module.signature_fns = signatures
    return module


def _fn_key(n_layers: int | None, tower: str, length: int) -> str:
    return f"{tower}_{length}" if n_layers is None else f"L{n_layers}_{tower}_{length}"


def _signature_tower(name: str, role: str) -> str:
    """The default signatures (``serving_default``, ``layers{n}``) embed with the query tower."""
    return "query" if name == "serving_default" or name.startswith("layers") and "_" not in name else role


# --------------------------------------------------------------------------------------------- tokenizer
def _tf_tokenizer(src: ExportSource, max_length: int, tokenizer_dir: str | os.PathLike | None,
                  scratch: Path) -> Any:
    """`TFTokenizer` from the tokenizer folder (or the HF tokenizer saved to `scratch`), checked to give the
    ids of the tokenizer the JAX encoder uses."""
    from embedjax.data.tf_tokenize import PROBE_TEXTS, TFTokenizer, TokenizerMismatchError

    tdir = Path(tokenizer_dir) if tokenizer_dir is not None else src.tokenizer_dir
    if tdir is None:
        tdir = scratch / "tokenizer"
        src.tokenizer.save_pretrained(str(tdir))
        (tdir / "config.json").write_text(json.dumps({"vocab_size": src.config.encoder.vocab_size}),
                                          encoding="utf-8")
    try:
        tok = TFTokenizer(tdir, max_length)
    except (TokenizerMismatchError, NotImplementedError, FileNotFoundError) as e:
        hint = ""
        if "Unigram" in str(e) or "spiece" in str(e):
            hint = (" (a SentencePiece model needs its spiece.model file: pass tokenizer_dir= / "
                    "--tokenizer-dir with the folder holding it)")
        raise ExportError(f"cannot build the in-graph tokenizer from {tdir}: {e}{hint}") from e
    if tok.spec.vocab_size > src.config.encoder.vocab_size:
        raise ExportError(f"{tdir}: tokenizer has {tok.spec.vocab_size} tokens but the model's vocabulary "
                          f"has {src.config.encoder.vocab_size}: they do not belong together")
    want = src.tokenizer(list(PROBE_TEXTS), add_special_tokens=True, truncation=True,
                         max_length=max_length)["input_ids"]
    got = tok.tokenize(np.array(PROBE_TEXTS, dtype=object)).to_list()
    for text, a, b in zip(PROBE_TEXTS, want, got):
        if list(a) != list(b):
            raise ExportError(f"{tdir}: the in-graph tokenizer disagrees with the model's tokenizer on "
                              f"{text!r}: {list(a)[:10]}... vs {list(b)[:10]}...")
    return tok


# ------------------------------------------------------------------------------------------------ warmup
def warmup_texts(tokenizer: Any, max_length: int, prompt: RolePrompt = None, role: str = "query",
                 word: str = "hello") -> dict[int, str]:
    """For each length bucket, a text whose token count (prompt and special tokens included) falls in it."""
    buckets = bucket_lengths(max_length)

    def count(n: int) -> int:
        text = format_text(prompt, role, " ".join([word] * n))
        enc = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)
        return len(enc["input_ids"])

    out: dict[int, str] = {}
    prev = 0
    for b in buckets:
        lo, hi = 0, b  # largest n in [0, b] with count(n) <= b
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count(mid) <= b:
                lo = mid
            else:
                hi = mid - 1
        if count(lo) > prev:
            out[b] = " ".join([word] * lo)
        else:
            log.warning("no warmup text lands in the length bucket %d (word %r); skipped", b, word)
        prev = b
    return out


def write_warmup(path: Path, requests: Iterable[tuple[str, list[str]]], model_name: str) -> int:
    """Writes TF Serving warmup records (PredictionLog with a PredictRequest each); returns how many."""
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    n = 0
    with tf.io.TFRecordWriter(str(path)) as w:
        for signature, texts in requests:
            req = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=model_name,
                                                                            signature_name=signature))
            tensor = tf.make_tensor_proto(np.array(texts, dtype=object), dtype=tf.string)
            req.inputs[INPUT_NAME].CopyFrom(tensor)
            rec = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=req))
            w.write(rec.SerializeToString())
            n += 1
    return n


# ------------------------------------------------------------------------------------------------ export
def _check_platforms(platforms: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(platforms, str):
        platforms = [p for p in platforms.split(",") if p.strip()]
    out = tuple(p.strip().lower() for p in platforms)
    if not out:
        raise ExportError("platforms: give at least one of " + ", ".join(SUPPORTED_PLATFORMS))
    bad = [p for p in out if p not in SUPPORTED_PLATFORMS]
    if bad:
        raise ExportError(f"platforms: unknown {bad}; supported: {', '.join(SUPPORTED_PLATFORMS)}")
    return tuple(dict.fromkeys(out))


def _prepare_output(output_dir: Path, overwrite: bool) -> Path:
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        if not overwrite:
            raise ExportError(f"{output_dir}: already exists and is not empty "
                              "(pass overwrite=True / --overwrite)")
    if not output_dir.name.isdigit():
        log.warning("%s: TF Serving only loads numeric version folders (BASE/1, BASE/2, ...); export to "
                    "%s/1 to serve it with --model_base_path=%s", output_dir, output_dir, output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the server (e.g. in docker) must read it
    return tmp


def export_saved_model(model: Any, output_dir: str | os.PathLike, *,
                       platforms: Sequence[str] | str = ("cpu",), max_length: int | None = None,
                       matryoshka_dims: Sequence[int] | None = None, precisions: Sequence[str] = (),
                       layers: Sequence[int] | None = None,
                       query_prompt: RolePrompt = FROM_MODEL, document_prompt: RolePrompt = FROM_MODEL,
                       role_signatures: bool | None = None, tokenizer_dir: str | os.PathLike | None = None,
                       step: int | None = None, warmup_batch_sizes: Sequence[int] | None = None,
                       batching: BatchingParameters = BatchingParameters(), model_name: str = "embedjax",
                       overwrite: bool = False, show_progress: bool = True) -> Path:
    """Writes a TF Serving SavedModel of `model` (an `Encoder`, a model folder / hub id, a training workdir or
    an `ExportSource`) to `output_dir` (``BASE/VERSION``); returns the folder.

    `matryoshka_dims` adds ``embedding_{d}`` outputs (default: the workdir's ``loss.matryoshka_dims`` less the
    full size, which is ``embedding``; given explicitly, the full size is an error).
    `precisions` (int8, uint8, binary, ubinary) adds ``embedding_{precision}`` / ``embedding_{d}_{precision}``
    codes, as `Encoder.encode(precision=...)` returns them (`embedjax.quantize`); int8 / uint8 need the model's
    calibration ranges for each output dim (`Encoder.calibrate`, saved as ``quantization_ranges.json``), which
    become constants of the graph. A model with whitening (`Encoder.fit_whitening`) is exported whitened.
    `layers` (2D Matryoshka; default: the workdir's ``loss.matryoshka_layers``) adds a ``layers{n}`` signature
    (and ``layers{n}_query`` / ``layers{n}_document`` with the role signatures) running only the first n encoder
    layers, with the same outputs except int8 / uint8 (the ranges are the full model's).
    `query_prompt` / `document_prompt`: a prefix string or a `Prompt`; default the model's own (its
    sentence-transformers prompts "query" and "document" / "passage", or a workdir's training prompts).
    `role_signatures` forces the ``query`` / ``document`` signatures on or off (default: when the model has
    prompts or separate towers). `warmup_batch_sizes` defaults to ``batching.allowed_batch_sizes``.
    The folder appears atomically (written beside it, then renamed): a polling server never sees half of it.
    """
    import jax
    import tensorflow as tf

    t_start = time.time()
    output_dir = Path(output_dir)
    platforms = _check_platforms(platforms)
    src = load_source(model, step=step)
    cfg = src.config
    max_len = int(max_length or cfg.max_length)
    if max_len < 2:
        raise ExportError(f"max_length must be >= 2, got {max_len}")
    pos_limit = getattr(cfg.encoder, "max_positions", None)
    if cfg.architecture == "bert" and max_len > min(cfg.max_length, pos_limit or cfg.max_length):
        raise ExportError(f"max_length {max_len} exceeds the model's {cfg.max_length}")
    out_dim = cfg.embedding_dim if src.whitening is None else int(src.whitening[1].shape[1])
    if matryoshka_dims is None:
        # the training dims (loss.matryoshka_dims) usually list the full size too (Gecko's (768, 256)), which
        # is the 'embedding' output itself: only the smaller ones become outputs of their own
        dims = tuple(int(d) for d in src.matryoshka_dims if int(d) != out_dim)
    else:
        dims = tuple(int(d) for d in matryoshka_dims)
    bad = [d for d in dims if not 1 <= d < out_dim]
    if bad:
        raise ExportError(f"matryoshka_dims {bad} must be in [1, {out_dim - 1}] "
                          f"(the full {out_dim} is the 'embedding' output)")
    dims = tuple(sorted(set(dims), reverse=True))
    precisions = tuple(dict.fromkeys(str(p) for p in precisions))
    from embedjax.quantize import PRECISIONS
    bad_p = [p for p in precisions if p not in PRECISIONS or p == "float32"]
    if bad_p:
        raise ExportError(f"precisions {bad_p}: choose from int8, uint8, binary, ubinary (float32 is always "
                          "there)")
    if any(p in ("int8", "uint8") for p in precisions):
        missing = [d for d in (out_dim, *dims) if d not in src.quantization_ranges]
        if missing:
            raise ExportError(f"int8 / uint8 outputs need calibration ranges for dims {missing}; the model has "
                              f"them for {sorted(src.quantization_ranges) or 'none'} (Encoder.calibrate(texts, "
                              f"dims=[...]) then save, or embedjax encode --calibrate)")
    from embedjax.models.dual_encoder import num_layers
    n_total = num_layers(cfg)
    sub_layers = tuple(sorted(set(int(n) for n in (src.matryoshka_layers if layers is None else layers))))
    bad_l = [n for n in sub_layers if not 1 <= n < n_total]
    if bad_l:
        raise ExportError(f"layers {bad_l} must be in [1, {n_total - 1}] (the model has {n_total} layers; the "
                          "full model is serving_default)")
    if sub_layers and src.whitening is not None:
        raise ExportError("layers: the whitening was fitted on the full model's embeddings, not on a "
                          "sub-network's; export the sub-network on its own (Encoder.truncated(n))")
    qp = src.query_prompt if query_prompt is FROM_MODEL else query_prompt
    dp = src.document_prompt if document_prompt is FROM_MODEL else document_prompt
    with_roles = bool(qp) or bool(dp) or not cfg.shared_towers
    if role_signatures is not None:
        with_roles = bool(role_signatures)
    roles: dict[str, tuple[str, RolePrompt, int | None]] = {"serving_default": ("query", None, None)}
    if with_roles:
        roles["query"] = ("query", qp or None, None)
        roles["document"] = ("document", dp or None, None)
    for n in sub_layers:
        roles[f"layers{n}"] = ("query", None, n)
        if with_roles:
            roles[f"layers{n}_query"] = ("query", qp or None, n)
            roles[f"layers{n}_document"] = ("document", dp or None, n)
    warm_sizes = tuple(int(s) for s in (warmup_batch_sizes if warmup_batch_sizes is not None
                                        else batching.allowed_batch_sizes))
    if any(s < 1 for s in warm_sizes):
        raise ExportError(f"warmup_batch_sizes must be positive, got {warm_sizes}")

    tmp = _prepare_output(output_dir, overwrite)
    try:
        with tempfile.TemporaryDirectory(prefix="embedjax-export-") as scratch:
            tokenizer = _tf_tokenizer(src, max_len, tokenizer_dir, Path(scratch))
            log.info("exporting %s (%s, dim %d, max_length %d, buckets %s, platforms %s, signatures %s)",
                     src.name or "<encoder>", cfg.architecture, cfg.embedding_dim, max_len,
                     bucket_lengths(max_len), ",".join(platforms), ", ".join(roles))
            module = _make_module(src, tokenizer, max_length=max_len, platforms=platforms,
                                  matryoshka_dims=dims, roles=roles, precisions=precisions,
                                  layers=sub_layers)
            _trace_model_fns(module, show_progress)
            tf.saved_model.save(module, str(tmp), signatures=module.signature_fns,
                                options=tf.saved_model.SaveOptions(experimental_custom_gradients=False))
        extra = tmp / "assets.extra"
        extra.mkdir(exist_ok=True)
        requests = []
        for name, (role, prompt, _) in roles.items():
            texts = warmup_texts(src.tokenizer, max_len, prompt, role)
            for _, text in sorted(texts.items()):
                requests += [(name, [text] * s) for s in warm_sizes]
        if len(requests) > MAX_WARMUP_RECORDS:
            log.warning("%d warmup requests; TF Serving reads only the first %d", len(requests),
                        MAX_WARMUP_RECORDS)
        n_warm = write_warmup(extra / WARMUP_FILE, requests, model_name)
        (extra / BATCHING_FILE).write_text(batching.to_text_proto(), encoding="utf-8")
        meta = {
            "format": "embedjax-saved-model/1",
            "source": src.name, "checkpoint_step": src.step,
            "architecture": cfg.architecture, "model_config": cfg.to_dict(),
            "embedding_dim": out_dim, "normalized": bool(cfg.head.normalize),
            "max_length": max_len, "length_buckets": list(bucket_lengths(max_len)),
            "platforms": list(platforms), "matryoshka_dims": list(dims), "precisions": list(precisions),
            "matryoshka_layers": list(sub_layers),
            "whitening": None if src.whitening is None else {"input_dim": cfg.embedding_dim, "output_dim": out_dim},
            "quantization_ranges": {str(d): src.quantization_ranges[d].tolist() for d in (out_dim, *dims)
                                    if d in src.quantization_ranges and any(p in ("int8", "uint8")
                                                                            for p in precisions)},
            "input": {"name": INPUT_NAME, "dtype": "string", "shape": [-1]},
            "outputs": output_names(dims, out_dim, precisions),
            "signatures": {name: {"role": role, "tower": _signature_tower(name, role), "layers": n or n_total,
                                  "prompt": _describe_prompt(p, role),
                                  "outputs": output_names(dims, out_dim, precisions, scalar=n is None)}
                           for name, (role, p, n) in roles.items()},
            "tokenizer": {"kind": tokenizer.spec.kind, "file": Path(tokenizer.spec.vocab_file).name,
                          "pad_id": tokenizer.spec.pad_id},
            "warmup": {"file": f"assets.extra/{WARMUP_FILE}", "records": n_warm,
                       "batch_sizes": list(warm_sizes)},
            "batching_parameters_file": f"assets.extra/{BATCHING_FILE}",
            "versions": {"jax": jax.__version__, "tensorflow": tf.__version__,
                         "embedjax": _embedjax_version()},
        }
        (extra / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if output_dir.exists():
            shutil.rmtree(output_dir) if output_dir.is_dir() else output_dir.unlink()
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s (%d warmup requests) in %.0fs", output_dir, n_warm, time.time() - t_start)
    return output_dir


def _trace_model_fns(module: Any, show_progress: bool) -> None:
    """Converts (jax2tf-lowers) every tower x bucket function up front, with a progress bar."""
    from embedjax.progress import track

    for key in track(list(module.model_fns), "jax2tf", "bucket", show=None if show_progress else False):
        module.model_fns[key].get_concrete_function()


def _describe_prompt(p: RolePrompt, role: str) -> Any:
    if p is None or isinstance(p, str):
        return p or None
    d = dataclasses.asdict(p)
    return {"template": d.pop("query" if role == "query" else "document"),
            **{k: v for k, v in d.items() if v and k not in ("query", "document")}}


def _embedjax_version() -> str:
    from embedjax import __version__
    return __version__


# ----------------------------------------------------------------------------------------------- loading
class SavedModelEncoder:
    """Calls an exported SavedModel in-process (``tf.saved_model.load``), in batches: ``.encode(texts)``."""

    def __init__(self, path: str | os.PathLike):
        import tensorflow as tf
        import tensorflow_text  # noqa: F401  (registers the tokenizer ops the graph uses)

        self.path = Path(path)
        if not (self.path / "saved_model.pb").is_file():
            raise FileNotFoundError(f"{self.path}: no saved_model.pb (not a SavedModel folder)")
        self._tf = tf
        self.model = tf.saved_model.load(str(self.path))
        meta = self.path / "assets.extra" / METADATA_FILE
        self.metadata = json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else {}

    @property
    def signatures(self) -> list[str]:
        return list(self.model.signatures.keys())

    def __call__(self, texts: Sequence[str | bytes],
                 signature: str = "serving_default") -> dict[str, np.ndarray]:
        fn = self.model.signatures[signature]
        out = fn(**{INPUT_NAME: self._tf.constant(list(texts), dtype=self._tf.string, shape=[len(texts)])})
        return {k: v.numpy() for k, v in out.items()}

    def encode(self, texts: Sequence[str], *, batch_size: int = 128, signature: str = "serving_default",
               output: str = OUTPUT_NAME, sort_by_length: bool = True,
               show_progress: bool | None = None) -> np.ndarray:
        """float32 [N, D]: `texts` in batches of `batch_size` through `signature`'s `output`.

        With `sort_by_length`, batches are formed from texts of similar length (longest first, by characters)
        so fewer are padded to a long bucket; the result is in input order either way."""
        from embedjax.progress import track

        texts = list(texts)
        if not texts:
            return self(texts, signature)[output]
        order = length_order(texts) if sort_by_length else np.arange(len(texts))
        out: np.ndarray | None = None
        starts = range(0, len(texts), batch_size)
        show = len(texts) >= 1024 if show_progress is None else show_progress
        for s in track(starts, "saved_model", "batch", show=None if show else False):
            idx = order[s:s + batch_size]
            emb = self([texts[i] for i in idx], signature)[output]
            if out is None:
                out = np.empty((len(texts), emb.shape[1]), np.float32)
            out[idx] = emb
        return out

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        out = self(texts, "tokenize")
        return out["input_ids"], out["attention_mask"]


def length_order(texts: Sequence[str | bytes]) -> np.ndarray:
    """Indices of `texts`, longest first (a cheap proxy for token length used to form batches)."""
    return np.argsort(-np.fromiter((len(t) for t in texts), np.int64, len(texts)), kind="stable")
