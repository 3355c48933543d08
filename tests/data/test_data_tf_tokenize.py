"""TF-side tokenizers give the same ids as the model's Hugging Face tokenizer (WordPiece: MiniLM's files on
every shipped text; SentencePiece: a tiny model trained here); a tokenizer that does not fit the model is
refused."""

from __future__ import annotations

import json
import shutil

import pytest

tf = pytest.importorskip("tensorflow")

from embedjax.data import tf_tokenize  # noqa: E402
from embedjax.data.sources import doc_text  # noqa: E402

EDGE_CASES = [
    "foo\u200bbar",
    "soft\u00adhyphen",
    "İstanbul",
    "ﬁne ﬃ",
    "ＦＵＬＬ width",
    "café naïve Ångström",
    "中文字符 mixed",
    "tab\there\nnew\rline",
    "\x00null",
    "a" * 150,
    "a" * 100,
    "a" * 101,
    "é" * 60,
    "α" * 60,
    "ж" * 101,
    "x" * 99 + "é",
    "emoji 😀 ok",
    "ß STRASSE",
    "Ǆ dz",
    "ΣΑΣ σας",
    "\ufffdrepl",
    "x\u0301y",
    "Ⅻ ½ µl m² …",
    "\u2028sep \u00a0nbsp",
    "$5 ^ `x` ~y |z| <a> +=",
    "日本語のテキスト",
    "한국어",
    "\u3000ideo",
    "a\u0085b",
    "e\ue000priv",
    "",
    "   ",
    "a\x0bb\x0cc",
    "CD3ϵ",
    "Nigeria\\'s",
]


def _shipped_texts(shipped) -> list[str]:
    texts = []
    for line in (shipped / "scifact" / "corpus.jsonl").read_text(encoding="utf-8").splitlines():
        d = json.loads(line)
        texts.append(doc_text(d["title"], d["text"]))
    for line in (shipped / "scifact" / "queries.jsonl").read_text(encoding="utf-8").splitlines():
        texts.append(json.loads(line)["text"])
    for split in ("train", "dev", "test"):
        for line in (shipped / "stsb" / f"{split}.tsv").read_text(encoding="utf-8").split("\n")[:-1]:
            f = line.split("\t")
            texts += [f[5], f[6]]
    return texts


def _first_diff(texts, a, b):
    for t, x, y in zip(texts, a, b):
        if list(x) != list(y):
            return f"{t[:80]!r}: hf {list(x)[:20]} vs tf {list(y)[:20]}"
    return None


def test_wordpiece_ids_equal_hf_on_all_shipped_text(shipped, minilm_vocab, hf_minilm):
    texts = _shipped_texts(shipped) + EDGE_CASES
    assert len(texts) > 23000
    for max_len in (256, 32):
        ref = hf_minilm(texts, truncation=True, max_length=max_len)["input_ids"]
        got = tf_tokenize.encode_tf(minilm_vocab, tf.constant(texts), max_len).to_list()
        assert _first_diff(texts, ref, got) is None
        assert any(len(r) == max_len for r in ref)  # truncation is exercised
        assert any(len(r) < max_len for r in ref)


def test_wordpiece_spec_and_vocabulary_api(minilm_dir, minilm_vocab, hf_minilm):
    spec = minilm_vocab.spec
    assert spec.kind == "wordpiece" and spec.lowercase and spec.strip_accents
    assert spec.prefix_ids == (hf_minilm.cls_token_id,) and spec.suffix_ids == (hf_minilm.sep_token_id,)
    assert minilm_vocab.vocab_size == 30522 and minilm_vocab.pad_id == 0
    ids = minilm_vocab.encode("Hello World, naïve!")
    assert ids == hf_minilm("Hello World, naïve!", add_special_tokens=False)["input_ids"]
    assert minilm_vocab.decode(ids) == "hello world , naive !"


def test_tf_tokenizer_module_pads(minilm_dir, hf_minilm):
    tok = tf_tokenize.TFTokenizer(minilm_dir, max_length=16)
    out = tok(
        tf.constant(
            [
                "a short one",
                "a much longer sentence that will certainly be cut at sixteen tokens as it goes on and on",
            ]
        ),
        pad_to=16,
    )
    assert out["input_ids"].shape == (2, 16) and out["attention_mask"].shape == (2, 16)
    ref = hf_minilm(["a short one"], padding="max_length", max_length=16, truncation=True)
    assert out["input_ids"][0].numpy().tolist() == ref["input_ids"][0]
    assert out["attention_mask"][0].numpy().tolist() == ref["attention_mask"][0]
    assert out["attention_mask"][1].numpy().sum() == 16


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory, shipped):
    """A T5-style folder with a 1000-piece unigram SentencePiece model trained on shipped STS-B train text."""
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("tiny_t5")
    lines = []
    for line in (shipped / "stsb" / "train.tsv").read_text(encoding="utf-8").split("\n")[:-1]:
        f = line.split("\t")
        lines += [f[5], f[6]]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(d / "spiece"),
        vocab_size=1000,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    (d / "config.json").write_text(json.dumps({"model_type": "t5", "vocab_size": 1100, "d_model": 8}))
    (d / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 100, "model_max_length": 512})
    )
    return d


def test_sentencepiece_ids_equal_hf(tiny_t5_dir, shipped):
    from transformers import AutoTokenizer

    vocab = tf_tokenize.load_vocabulary(tiny_t5_dir)
    hf = AutoTokenizer.from_pretrained(str(tiny_t5_dir))
    assert (
        vocab.spec.kind == "sentencepiece" and vocab.spec.prefix_ids == () and vocab.spec.suffix_ids == (1,)
    )
    texts = []
    for split in ("dev", "test"):
        for line in (shipped / "stsb" / f"{split}.tsv").read_text(encoding="utf-8").split("\n")[:-1]:
            f = line.split("\t")
            texts += [f[5], f[6]]
    texts += ["  leading  and double  spaces ", "ﬁne ＦＵＬＬ café", "中文 😀", "", "x" * 300]
    for max_len in (128, 8):
        ref = hf(texts, truncation=True, max_length=max_len)["input_ids"]
        got = tf_tokenize.encode_tf(vocab, tf.constant(texts), max_len).to_list()
        assert _first_diff(texts, ref, got) is None
    assert all(r[-1] == 1 for r in got)  # </s> kept after truncation


def test_tokenizer_that_does_not_match_the_model_is_refused(tmp_path, minilm_dir, tiny_t5_dir):
    # A model folder whose vocab.txt has two tokens swapped: ids differ on the probes.
    bad = tmp_path / "swapped"
    bad.mkdir()
    for name in ("config.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_dir / name, bad / name)
    vocab = (minilm_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")
    i, j = vocab.index("hello"), vocab.index("world")
    vocab[i], vocab[j] = vocab[j], vocab[i]
    (bad / "vocab.txt").write_text("\n".join(vocab), encoding="utf-8")
    swapped_vocab = tf_tokenize.load_vocabulary(bad)  # consistent with its own folder...
    with pytest.raises(tf_tokenize.TokenizerMismatchError, match="does not match the model"):
        tf_tokenize.check_vocabulary(swapped_vocab, minilm_dir)  # ...but not MiniLM's
    # A tokenizer with more tokens than the model has embeddings.
    small = tmp_path / "small_model"
    shutil.copytree(tiny_t5_dir, small)
    (small / "config.json").write_text(json.dumps({"model_type": "t5", "vocab_size": 500}))
    with pytest.raises(tf_tokenize.TokenizerMismatchError, match="only 500 embeddings"):
        tf_tokenize.load_vocabulary(small)
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        tf_tokenize.tokenizer_spec(tmp_path)


def test_tf_tokenizer_survives_a_savedmodel_round_trip(tmp_path, minilm_dir, hf_minilm):
    """The export reuses TFTokenizer inside a serving signature: it must save and load with the same ids."""
    tok = tf_tokenize.TFTokenizer(minilm_dir, max_length=32)

    class Serve(tf.Module):
        def __init__(self):
            super().__init__()
            self.tok = tok

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def __call__(self, texts):
            return self.tok(texts)

    tf.saved_model.save(Serve(), str(tmp_path / "sm"))
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    texts = ["Hello, naïve world!", "CD3ϵ cells at 5 µl/ml", "a " * 40]
    out = loaded(tf.constant(texts))
    ref = hf_minilm(texts, truncation=True, max_length=32, padding="longest")
    assert out["input_ids"].numpy().tolist() == ref["input_ids"]
    assert out["attention_mask"].numpy().tolist() == ref["attention_mask"]
