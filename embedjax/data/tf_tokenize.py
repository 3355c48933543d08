"""The model's own tokenizer as TensorFlow ops, for seqio training pipelines and SavedModel serving.

`load_vocabulary(model_dir)` reads a model folder (Hugging Face or sentence-transformers layout) and returns a
`seqio.Vocabulary` that gives the same token ids as ``transformers.AutoTokenizer.from_pretrained(model_dir)``:

* WordPiece (BERT family): `WordPieceVocabulary`, built on ``tensorflow_text.FastWordpieceTokenizer``. The
  Hugging Face BertNormalizer (control-character removal, CJK spacing, NFD accent stripping, lower-casing, as
  the tokenizer's own config says) and BertPreTokenizer (split on whitespace and punctuation) are reproduced
  with TF string ops in front of it, including the 100-characters-per-word limit, so the ids match exactly
  (checked on every shipped SciFact and STS-B text in tests/data/test_data_tf_tokenize.py).
  ``FastBertTokenizer``'s own normaliser is not used: it applies compatibility folding (``µ`` -> ``μ``,
  ``…`` -> ``...``, ``²`` -> ``2``) that the HF tokenizer does not.
* SentencePiece (T5 family): ``seqio.SentencePieceVocabulary`` on the folder's ``spiece.model``.
* Any other Hugging Face fast tokenizer (byte-level BPE: Qwen3, RoBERTa, ModernBERT): `HFTokenizerVocabulary`,
  the tokenizer itself (the Rust ``tokenizers`` library) called from the input pipeline through
  ``tf.py_function``: the ids are the model's by construction, for training; it is not a graph op, so such a
  model cannot be exported with the tokenizer inside a SavedModel (`TFTokenizer` refuses it).

Special tokens and truncation (`encode_tf`) follow the Hugging Face tokenizer of the same folder: the ids it
puts before and after a text (``[CLS] ... [SEP]`` for BERT, ``... </s>`` for T5) are read from it, and a text
longer than ``max_length`` keeps its first ``max_length - len(specials)`` tokens, as ``tokenizer(text,
truncation=True, max_length=...)`` does. `TFTokenizer` packages this as a ``tf.Module`` for export.

A vocabulary that does not belong to the model (different ids on probe texts, or ids beyond the model's
embedding table) raises `TokenizerMismatchError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import seqio
import tensorflow as tf
import tensorflow_text as tf_text

from embedjax import errors

# Texts on which a vocabulary must agree with the model's Hugging Face tokenizer.
PROBE_TEXTS = (
    "Hello, World! The quick brown fox jumps over the lazy dog.",
    "COVID-19 mRNA vaccines showed ~95% efficacy (n=43,548) — see Table 2.",
    "naïve café résumé Ångström façade",
    "Anti-inflammatory IL-23/IL-17 axis in CD4+ T cells; p<0.001.",
    "日本語のテキスト and 中文 mixed with English",
    "A plane is taking off.",
    "\"Quoted\" text with 'apostrophes' and $100 & 50€.",
)

_SP_FILES = ("spiece.model", "tokenizer.model", "sentencepiece.bpe.model", "sentencepiece.model")
# CJK ideograph blocks that BERT surrounds with spaces (as transformers' BasicTokenizer._is_chinese_char).
_CJK = (
    r"([\x{4E00}-\x{9FFF}\x{3400}-\x{4DBF}\x{20000}-\x{2A6DF}\x{2A700}-\x{2B73F}\x{2B740}-\x{2B81F}"
    r"\x{2B820}-\x{2CEAF}\x{F900}-\x{FAFF}\x{2F800}-\x{2FA1F}])"
)
# The BERT pre-tokenizer splits on whitespace (dropped) and on each punctuation character (kept as a token):
# ASCII punctuation ranges plus Unicode category P (transformers' _is_punctuation, tokenizers' is_bert_punc).
_PUNCT = r"[!-/:-@\[-`{-~\p{P}]"
_DELIM = r"[\s\p{Z}!-/:-@\[-`{-~\p{P}]"
_LONG_WORD_SENTINEL = "\ue000"  # a private-use character: removed by clean_text, so never in real input


TokenizerMismatchError = errors.TokenizerMismatchError   # defined in embedjax/errors.py (one module of error types)


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """Everything needed to rebuild a model's tokenizer in TF (read from its folder by `tokenizer_spec`)."""

    kind: Literal["wordpiece", "sentencepiece", "hf"]
    tokenizer_dir: str
    vocab_file: str  # vocab.txt / tokenizer.json (WordPiece) or the .model (SentencePiece)
    prefix_ids: tuple[int, ...] = ()  # special ids before the text ([CLS])
    suffix_ids: tuple[int, ...] = ()  # special ids after the text ([SEP] / </s>)
    pad_id: int = 0
    vocab_size: int = 0  # tokens the tokenizer can emit
    model_vocab_size: int | None = None  # rows of the model's embedding table (config.json), when known
    # WordPiece only (the Hugging Face BertNormalizer / WordPiece settings):
    lowercase: bool = True
    strip_accents: bool = True
    clean_text: bool = True
    handle_chinese_chars: bool = True
    unk_token: str = "[UNK]"
    continuing_prefix: str = "##"
    max_chars_per_word: int = 100

    @property
    def num_special(self) -> int:
        return len(self.prefix_ids) + len(self.suffix_ids)


# ----------------------------------------------------------------------------------------- reading a folder
def find_tokenizer_dir(model_dir: str | os.PathLike) -> Path:
    """The folder with the tokenizer files: `model_dir` or its ``0_Transformer/`` (older ST layout)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such model folder")
    names = ("tokenizer.json", "vocab.txt", "tokenizer_config.json") + _SP_FILES
    for cand in (d, d / "0_Transformer"):
        if any((cand / n).is_file() for n in names):
            return cand
    raise FileNotFoundError(f"{d}: no tokenizer files (tokenizer.json, vocab.txt or spiece.model)")


def _hf_tokenizer(tdir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tdir))
    except Exception as e:  # noqa: BLE001 - any failure here means the folder's tokenizer is unusable
        raise TokenizerMismatchError(
            f"{tdir}: transformers cannot load this tokenizer ({type(e).__name__}: {e})"
        ) from e


def _special_ids(hf: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(prefix, suffix) special ids the HF tokenizer wraps a single text with."""
    probe = "hello world"
    plain = list(hf(probe, add_special_tokens=False)["input_ids"])
    full = list(hf(probe, add_special_tokens=True)["input_ids"])
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return tuple(full[:i]), tuple(full[i + len(plain) :])
    raise TokenizerMismatchError(f"cannot locate the text inside the tokenizer's output ({full} vs {plain})")


def tokenizer_spec(model_dir: str | os.PathLike) -> TokenizerSpec:
    """Reads the tokenizer settings of a model folder (and its HF tokenizer, for the special tokens)."""
    tdir = find_tokenizer_dir(model_dir)
    model_vocab = None
    for cfg_dir in (tdir, Path(model_dir)):
        if (cfg_dir / "config.json").is_file():
            cfg = json.loads((cfg_dir / "config.json").read_text(encoding="utf-8"))
            model_vocab = cfg.get("vocab_size")
            break
    hf = _hf_tokenizer(tdir)
    prefix, suffix = _special_ids(hf)
    pad_id = hf.pad_token_id if hf.pad_token_id is not None else 0
    tok_json = tdir / "tokenizer.json"
    tj = json.loads(tok_json.read_text(encoding="utf-8")) if tok_json.is_file() else None
    model_type = (tj or {}).get("model", {}).get("type")
    sp_file = next((tdir / n for n in _SP_FILES if (tdir / n).is_file()), None)

    if model_type == "WordPiece" or (tj is None and (tdir / "vocab.txt").is_file() and sp_file is None):
        kw: dict[str, Any] = {}
        if tj is not None:
            norm = tj.get("normalizer") or {}
            if norm.get("type") != "BertNormalizer":
                raise NotImplementedError(
                    f"{tok_json}: WordPiece with normalizer {norm.get('type')!r} is not "
                    "supported (only BertNormalizer)"
                )
            pre = (tj.get("pre_tokenizer") or {}).get("type")
            if pre != "BertPreTokenizer":
                raise NotImplementedError(
                    f"{tok_json}: pre-tokenizer {pre!r} is not supported (only BertPreTokenizer)"
                )
            m = tj["model"]
            lower = bool(norm.get("lowercase", True))
            strip = norm.get("strip_accents")
            kw = dict(
                lowercase=lower,
                strip_accents=lower if strip is None else bool(strip),
                clean_text=bool(norm.get("clean_text", True)),
                handle_chinese_chars=bool(norm.get("handle_chinese_chars", True)),
                unk_token=m.get("unk_token", "[UNK]"),
                continuing_prefix=m.get("continuing_subword_prefix", "##"),
                max_chars_per_word=int(m.get("max_input_chars_per_word", 100)),
            )
            vocab_file = tok_json
        else:
            tc_file = tdir / "tokenizer_config.json"
            tc = json.loads(tc_file.read_text(encoding="utf-8")) if tc_file.is_file() else {}
            lower = bool(tc.get("do_lower_case", True))
            strip = tc.get("strip_accents")
            kw = dict(
                lowercase=lower,
                strip_accents=lower if strip is None else bool(strip),
                handle_chinese_chars=bool(tc.get("tokenize_chinese_chars", True)),
                unk_token=tc.get("unk_token", "[UNK]"),
            )
            vocab_file = tdir / "vocab.txt"
        vocab = _wordpiece_vocab_list(vocab_file)
        return TokenizerSpec(
            "wordpiece", str(tdir), str(vocab_file), prefix, suffix, pad_id, len(vocab), model_vocab, **kw
        )
    if sp_file is not None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(sp_file))
        return TokenizerSpec(
            "sentencepiece", str(tdir), str(sp_file), prefix, suffix, pad_id, sp.get_piece_size(), model_vocab
        )
    if tj is not None and getattr(hf, "is_fast", False):   # byte-level BPE and the like: the tokenizer itself
        return TokenizerSpec("hf", str(tdir), str(tok_json), prefix, suffix, pad_id, len(hf), model_vocab)
    raise NotImplementedError(
        f"{tdir}: tokenizer model {model_type!r} is not supported (WordPiece with vocab.txt / "
        "tokenizer.json, SentencePiece with spiece.model, or a fast tokenizer's tokenizer.json)"
    )


def _model_type(tokenizer_json: str | os.PathLike) -> str:
    return json.loads(Path(tokenizer_json).read_text(encoding="utf-8")).get("model", {}).get("type", "?")


def _wordpiece_vocab_list(vocab_file: str | os.PathLike) -> list[str]:
    """Tokens by id, from vocab.txt (one a line) or tokenizer.json (model.vocab plus added tokens)."""
    p = Path(vocab_file)
    if p.suffix == ".json":
        tj = json.loads(p.read_text(encoding="utf-8"))
        table = dict(tj["model"]["vocab"])
        for t in tj.get("added_tokens", []):
            table.setdefault(t["content"], t["id"])
        n = max(table.values()) + 1
        out = [""] * n
        for tok, i in table.items():
            out[i] = tok
        missing = [i for i, t in enumerate(out) if not t]
        if missing:
            raise TokenizerMismatchError(
                f"{p}: vocabulary ids are not contiguous (no token for id {missing[0]})"
            )
        return out
    lines = p.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file's final newline
    return [line.rstrip("\r") for line in lines]


# ------------------------------------------------------------------------------------------------ WordPiece
class WordPieceVocabulary(seqio.Vocabulary):
    """A BERT WordPiece vocabulary as a seqio Vocabulary (ids without special tokens; see `encode_tf`)."""

    def __init__(self, spec: TokenizerSpec):
        if spec.kind != "wordpiece":
            raise ValueError(f"WordPieceVocabulary needs a wordpiece spec, got {spec.kind!r}")
        self.spec = spec
        self._vocab = _wordpiece_vocab_list(spec.vocab_file)
        if _LONG_WORD_SENTINEL in self._vocab:
            raise NotImplementedError(
                f"{spec.vocab_file}: vocabulary contains U+E000, used internally as a sentinel"
            )
        if spec.unk_token not in self._vocab:
            raise TokenizerMismatchError(
                f"{spec.vocab_file}: unknown token {spec.unk_token!r} is not in the vocabulary"
            )
        self._unk_id = self._vocab.index(spec.unk_token)
        # Words are split beforehand (`pretokenize_tf`), where the character limit is applied; the byte limit
        # here only has to let every word of <= max_chars_per_word characters through (<= 4 bytes each).
        self._tokenizer = tf_text.FastWordpieceTokenizer(
            vocab=self._vocab,
            suffix_indicator=spec.continuing_prefix,
            max_bytes_per_word=4 * spec.max_chars_per_word,
            token_out_type=tf.int32,
            unknown_token=spec.unk_token,
            no_pretokenization=True,
            support_detokenization=True,
        )
        super().__init__(extra_ids=0)

    @property
    def eos_id(self) -> int | None:
        return None  # BERT has no EOS; [SEP] is added by `encode_tf` as a suffix special token

    @property
    def unk_id(self) -> int:
        return self._unk_id

    @property
    def pad_id(self) -> int:
        return self.spec.pad_id

    @property
    def _base_vocab_size(self) -> int:
        return len(self._vocab)

    def normalize_tf(self, texts: tf.Tensor) -> tf.Tensor:
        """The Hugging Face BertNormalizer with TF string ops."""
        s = self.spec
        t = texts
        if s.clean_text:
            t = tf.strings.regex_replace(t, r"[\t\n\r]", " ")
            t = tf.strings.regex_replace(t, r"[\x{0}\x{FFFD}\p{Cc}\p{Cf}\p{Co}\p{Cs}]", "")
            t = tf.strings.regex_replace(t, r"\p{Z}", " ")
        if s.handle_chinese_chars:
            t = tf.strings.regex_replace(t, _CJK, r" \1 ")
        if s.strip_accents:
            t = tf_text.normalize_utf8(t, "NFD")
            t = tf.strings.regex_replace(t, r"\p{Mn}", "")
        if s.lowercase:
            # Rust's char::to_lowercase has no final-sigma rule; ICU (tf.strings.lower) does.
            t = tf.strings.regex_replace(t, "\u03a3", "\u03c3")
            t = tf.strings.lower(t, encoding="utf-8")
        return t

    def pretokenize_tf(self, texts: tf.Tensor) -> tf.RaggedTensor:
        """Normalised words, [N] -> [N, (W)]; a word over max_chars_per_word characters becomes [UNK]."""
        words = tf_text.regex_split(self.normalize_tf(texts), _DELIM, _PUNCT)
        n_chars = tf.strings.length(words, unit="UTF8_CHAR")
        limit = self.spec.max_chars_per_word
        return tf.ragged.map_flat_values(
            lambda w, n: tf.where(n > limit, _LONG_WORD_SENTINEL, w), words, n_chars
        )

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        s = tf.convert_to_tensor(s, tf.string)
        if s.shape.rank == 0:
            return self._encode_tf(s[tf.newaxis])[0]
        return self._tokenizer.tokenize(self.pretokenize_tf(s)).merge_dims(1, 2)

    def _encode(self, s: str) -> list[int]:
        return self._encode_tf(tf.constant([s]))[0].numpy().tolist()

    def _decode(self, ids: Sequence[int]) -> str:
        words: list[str] = []
        pre = self.spec.continuing_prefix
        for i in ids:
            if i == self.pad_id or i in self.spec.prefix_ids or i in self.spec.suffix_ids:
                continue
            tok = self._vocab[i] if 0 <= i < len(self._vocab) else self.spec.unk_token
            if tok.startswith(pre) and words:
                words[-1] += tok[len(pre) :]
            else:
                words.append(tok)
        return " ".join(words)

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        return self._tokenizer.detokenize(ids)  # words joined by spaces (punctuation spacing is not restored)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WordPieceVocabulary) and self.spec == other.spec

    def __hash__(self) -> int:
        return hash(self.spec)

    def __repr__(self) -> str:
        return f"WordPieceVocabulary({self.spec.vocab_file}, lowercase={self.spec.lowercase})"


# -------------------------------------------------------------------------------------------- SentencePiece
class SpecSentencePieceVocabulary(seqio.SentencePieceVocabulary):
    """``seqio.SentencePieceVocabulary`` that also carries the model's `TokenizerSpec` (special tokens)."""

    def __init__(self, spec: TokenizerSpec):
        if spec.kind != "sentencepiece":
            raise ValueError(f"SpecSentencePieceVocabulary needs a sentencepiece spec, got {spec.kind!r}")
        self.spec = spec
        super().__init__(spec.vocab_file, extra_ids=0)


class HFTokenizerVocabulary(seqio.Vocabulary):
    """The folder's Hugging Face fast tokenizer as a seqio Vocabulary (ids without special tokens; see
    `encode_tf`), run by ``tf.py_function`` in the input pipeline: exact by construction, not a graph op."""

    def __init__(self, spec: TokenizerSpec):
        if spec.kind != "hf":
            raise ValueError(f"HFTokenizerVocabulary needs an hf spec, got {spec.kind!r}")
        self.spec = spec
        self._hf = _hf_tokenizer(Path(spec.tokenizer_dir))
        super().__init__(extra_ids=0)

    @property
    def _base_vocab_size(self) -> int:
        return self.spec.vocab_size

    @property
    def eos_id(self) -> int | None:
        return self._hf.eos_token_id

    @property
    def unk_id(self) -> int | None:
        return self._hf.unk_token_id

    def _encode(self, s: str) -> list[int]:
        return list(self._hf(s, add_special_tokens=False)["input_ids"])

    def _decode(self, ids: Sequence[int]) -> str:
        return self._hf.decode(list(ids))

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        def encode(texts):
            batch = [t.decode("utf-8", "replace") for t in texts.numpy().reshape(-1)]
            ids = self._hf(batch, add_special_tokens=False)["input_ids"] if batch else []
            lengths = np.array([len(x) for x in ids], np.int64)
            flat = np.array([i for x in ids for i in x], np.int32)
            return flat, lengths

        scalar = s.shape.rank == 0
        texts = tf.reshape(s, [-1])
        flat, lengths = tf.py_function(encode, [texts], (tf.int32, tf.int64))
        flat.set_shape([None])
        lengths.set_shape([None])
        out = tf.RaggedTensor.from_row_lengths(flat, lengths)
        return out[0] if scalar else out

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError("HFTokenizerVocabulary decodes in Python only (decode)")

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, HFTokenizerVocabulary) and other.spec == self.spec


# ------------------------------------------------------------------------------------------- public helpers
ModelVocabulary = WordPieceVocabulary | SpecSentencePieceVocabulary | HFTokenizerVocabulary


def make_vocabulary(spec: TokenizerSpec) -> ModelVocabulary:
    """The seqio Vocabulary for a spec (WordPiece, SentencePiece, or the HF tokenizer itself); ``vocab.spec`` is
    the spec."""
    if spec.kind == "wordpiece":
        return WordPieceVocabulary(spec)
    if spec.kind == "hf":
        return HFTokenizerVocabulary(spec)
    return SpecSentencePieceVocabulary(spec)


def load_vocabulary(model_dir: str | os.PathLike, *, check: bool = True) -> ModelVocabulary:
    """The seqio vocabulary of a model folder (``.spec`` holds its settings); with `check`, verified against
    the folder's Hugging Face tokenizer and model config."""
    vocab = make_vocabulary(tokenizer_spec(model_dir))
    if check:
        check_vocabulary(vocab, model_dir)
    return vocab


def encode_tf(vocab: ModelVocabulary, texts: tf.Tensor, max_length: int) -> tf.RaggedTensor:
    """Ids with the model's special tokens, truncated to `max_length` as HF does: [N] strings -> [N, (L)]."""
    spec = vocab.spec
    if max_length <= spec.num_special:
        raise ValueError(
            f"max_length {max_length} leaves no room for text after {spec.num_special} special token(s)"
        )
    texts = tf.convert_to_tensor(texts, tf.string)
    ids = vocab.encode_tf(texts)
    if not isinstance(ids, tf.RaggedTensor):
        ids = tf.RaggedTensor.from_tensor(ids)
    ids = tf.cast(ids, tf.int32)[:, : max_length - spec.num_special]
    n = ids.nrows()
    parts = []
    if spec.prefix_ids:
        parts.append(tf.RaggedTensor.from_tensor(tf.tile(tf.constant([spec.prefix_ids], tf.int32), [n, 1])))
    parts.append(ids)
    if spec.suffix_ids:
        parts.append(tf.RaggedTensor.from_tensor(tf.tile(tf.constant([spec.suffix_ids], tf.int32), [n, 1])))
    return tf.concat(parts, axis=1) if len(parts) > 1 else ids


def check_vocabulary(
    vocab: ModelVocabulary, model_dir: str | os.PathLike, probes: Sequence[str] = PROBE_TEXTS
) -> None:
    """Raises `TokenizerMismatchError` unless `vocab` gives the model folder's HF tokenizer ids on `probes`
    and stays inside the model's embedding table (``config.json`` vocab_size)."""
    spec = vocab.spec
    model_vocab = tokenizer_spec(model_dir).model_vocab_size
    if model_vocab is not None and vocab.vocab_size > model_vocab:
        raise TokenizerMismatchError(
            f"{spec.vocab_file}: tokenizer has {vocab.vocab_size} tokens but the model {model_dir} has only "
            f"{model_vocab} embeddings: this tokenizer does not belong to this model"
        )
    hf = _hf_tokenizer(find_tokenizer_dir(model_dir))
    ref = hf(list(probes), add_special_tokens=True, truncation=True, max_length=512)["input_ids"]
    got = encode_tf(vocab, tf.constant(list(probes)), 512).to_list()
    for text, a, b in zip(probes, ref, got):
        if list(a) != list(b):
            raise TokenizerMismatchError(
                f"{spec.vocab_file}: tokenizer does not match the model {model_dir}: on {text!r} the model's "
                f"tokenizer gives {list(a)[:12]}... but this one gives {list(b)[:12]}..."
            )


class TFTokenizer(tf.Module):
    """A model's tokenizer as a ``tf.Module`` (texts -> padded ids + mask), for SavedModel export and serving.

    ``tok(texts)`` returns ``{"input_ids": int32 [N, L], "attention_mask": int32 [N, L]}`` with
    ``L = pad_to`` if given, else the longest row (at most ``max_length``).
    """

    def __init__(
        self, model_dir: str | os.PathLike, max_length: int, *, check: bool = True, name: str | None = None
    ):
        super().__init__(name=name)
        spec = tokenizer_spec(model_dir)
        if spec.kind == "hf":
            raise NotImplementedError(
                f"{spec.vocab_file}: a {_model_type(spec.vocab_file)} tokenizer has no TensorFlow graph form here "
                "(only WordPiece and SentencePiece do), so it cannot be put inside a SavedModel")
        self.vocab = load_vocabulary(model_dir, check=check)
        self.spec = self.vocab.spec
        self.max_length = int(max_length)

    def tokenize(self, texts: tf.Tensor) -> tf.RaggedTensor:
        return encode_tf(self.vocab, texts, self.max_length)

    def __call__(self, texts: tf.Tensor, pad_to: int | None = None) -> dict[str, tf.Tensor]:
        ids = self.tokenize(texts)
        shape = None if pad_to is None else [None, int(pad_to)]
        dense = ids.to_tensor(default_value=self.spec.pad_id, shape=shape)
        mask = tf.ones_like(ids).to_tensor(default_value=0, shape=shape)
        return {"input_ids": dense, "attention_mask": mask}
