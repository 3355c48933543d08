"""RoBERTa, XLM-RoBERTa (multilingual-e5, bge-m3 start from them), MPNet (all-mpnet-base-v2) and ModernBERT
(local / global attention, rotary positions, GeGLU; modernbert-embed, gte-modernbert): tiny random
models built with transformers' PyTorch classes agree with embedjax's BERT-family encoder after loading
(positions counted from pad_token_id + 1 over the real tokens, MPNet's relative position bias, padding present); a sentence-transformers folder saved by the installed
sentence-transformers (its 6.x layout) loads and encodes as `SentenceTransformer.encode` does, and what embedjax
saves loads back in sentence-transformers with the same embeddings."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
st = pytest.importorskip("sentence_transformers")

TEXTS = ["a short one", "a rather longer sentence with several more words in it to pad the others",
         "tokens, punctuation; and UNUSUAL casing!", "x",
         " ".join(["the words of a text longer than the 48-token limit, which both sides must cut alike"] * 4)]


def _tiny(kind: str):
    torch.manual_seed(0)
    if kind == "modernbert":   # 4 layers: global, local, local, global; a window of 4 tokens either side
        cfg = transformers.ModernBertConfig(
            vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=128, local_attention=8, pad_token_id=1, bos_token_id=0, eos_token_id=2,
            cls_token_id=0, sep_token_id=2, attention_dropout=0.0, embedding_dropout=0.0, mlp_dropout=0.0)
        cfg._attn_implementation = "eager"
        return transformers.ModernBertModel(cfg).eval()
    cls = {"roberta": (transformers.RobertaConfig, transformers.RobertaModel),
           "xlm-roberta": (transformers.XLMRobertaConfig, transformers.XLMRobertaModel),
           "mpnet": (transformers.MPNetConfig, transformers.MPNetModel)}[kind]
    extra = {} if kind == "mpnet" else {"type_vocab_size": 1}
    cfg = cls[0](vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=66, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **extra)
    return cls[1](cfg, add_pooling_layer=False).eval()


@pytest.mark.parametrize("kind", ["roberta", "xlm-roberta", "mpnet", "modernbert"])
def test_hidden_states_match(tmp_path, kind):
    from embedjax.models.convert import load_folder
    from embedjax.models.dual_encoder import ARCHITECTURES

    model = _tiny(kind)
    if kind == "mpnet":   # a non-zero relative position bias (transformers initialises the table near zero)
        with torch.no_grad():
            model.encoder.relative_attention_bias.weight.normal_(0, 1.0)
    model.save_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 300, size=(3, 40)).astype(np.int64)
    ids[:, 0], mask = 0, np.ones_like(ids)
    mask[1, 25:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 1          # RoBERTa's padding id
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    cfg, params, _, _ = load_folder(tmp_path)
    assert cfg.encoder.model_type == kind
    if kind == "modernbert":
        assert cfg.architecture == "modernbert" and cfg.max_length == 128
        assert cfg.encoder.layer_types == ("full_attention", "sliding_attention", "sliding_attention",
                                           "full_attention")
    else:
        assert cfg.architecture == "bert" and cfg.encoder.position_offset == 2
        assert cfg.max_length == 64     # 66 positions, the first two never used
    ours = np.asarray(ARCHITECTURES[cfg.architecture][1](cfg.encoder).apply(
        {"params": params["tower"]["encoder"]}, ids.astype(np.int32), mask.astype(np.int32)))
    valid = mask.astype(bool)
    assert np.abs(ours[valid] - ref[valid]).max() <= 1e-5


def _bpe_tokenizer(path):
    """A byte-level BPE tokenizer trained here (RoBERTa's kind) with RoBERTa's <s> ... </s> framing. Built from
    the tokenizer object: transformers 5's RobertaTokenizerFast(vocab_file=...) ignores the files it is given."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing

    words = " ".join(TEXTS) + " the of and to in is was for on with as by at from this that"
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([words] * 20, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe._tokenizer.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                               cls_token="<s>", sep_token="</s>", pad_token="<pad>",
                                               unk_token="<unk>", mask_token="<mask>")
    ids = tok("a short one")["input_ids"]
    assert tok.pad_token_id == 1 and ids[0] == 0 and ids[-1] == 2 and len(ids) > 4 and 3 not in ids, ids
    return tok


@pytest.mark.parametrize("kind", ["roberta", "mpnet", "modernbert"])
def test_sentence_transformers_folder_round_trip(tmp_path, kind):
    from embedjax import Encoder

    tok = _bpe_tokenizer(tmp_path / "tok")
    model = _tiny(kind)
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    from sentence_transformers.sentence_transformer import modules

    transformer = modules.Transformer(str(hf_dir), max_seq_length=48)
    pooling = modules.Pooling(transformer.get_embedding_dimension(), "mean")
    ref_model = st.SentenceTransformer(modules=[transformer, pooling, modules.Normalize()], device="cpu")
    folder = tmp_path / "st"
    ref_model.save(str(folder))
    pool_cfg = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert "pooling_mode" in pool_cfg     # the 6.x layout, not the pooling_mode_* flags
    ref = ref_model.encode(TEXTS, convert_to_numpy=True)

    enc = Encoder.load(folder)
    assert enc.config.encoder.model_type == kind and enc.max_length == 48
    ours = enc.encode(TEXTS)
    assert np.abs(ours - ref).max() <= 1e-5
    # and back: what embedjax writes, sentence-transformers reads, with the same embeddings
    back = enc.save(tmp_path / "ours")
    again = st.SentenceTransformer(str(back), device="cpu").encode(TEXTS, convert_to_numpy=True)
    assert np.abs(again - ref).max() <= 1e-5
    assert json.loads((back / "config.json").read_text())["model_type"] == kind


# Published configurations (their config.json values): the parameter count of embedjax's encoder equals that of
# transformers' model built from the same configuration (on torch's meta device: no memory), and the published
# size (the model cards' figures, in millions, without the pooler embedjax does not use).
FULL_SIZE = {
    "t5-base encoder": ("t5", dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
                                   model_type="t5"), 109.6),
    "xlm-roberta-base": ("xlm-roberta", dict(vocab_size=250002, hidden_size=768, num_hidden_layers=12,
                                             num_attention_heads=12, intermediate_size=3072,
                                             max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                                             layer_norm_eps=1e-5, model_type="xlm-roberta"), 277.5),
    "mpnet-base": ("mpnet", dict(vocab_size=30527, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                 intermediate_size=3072, max_position_embeddings=514, layer_norm_eps=1e-5,
                                 relative_attention_num_buckets=32, pad_token_id=1, model_type="mpnet"), 108.9),
    "modernbert-base": ("modernbert", dict(vocab_size=50368, hidden_size=768, intermediate_size=1152,
                                           num_hidden_layers=22, num_attention_heads=12,
                                           max_position_embeddings=8192, pad_token_id=50283,
                                           model_type="modernbert"), 149.0),
}


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_parameter_counts(name):
    import jax

    from embedjax.models.convert import encoder_config_from_hf
    from embedjax.models.dual_encoder import HeadConfig, ModelConfig, init_params

    kind, hf, published_m = FULL_SIZE[name]
    arch, enc = encoder_config_from_hf(hf, name)
    cfg = ModelConfig(arch, enc, HeadConfig(normalize=False), max_length=128)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    classes = {"t5": (transformers.T5Config, transformers.T5EncoderModel, {}),
               "xlm-roberta": (transformers.XLMRobertaConfig, transformers.XLMRobertaModel,
                               {"add_pooling_layer": False}),
               "mpnet": (transformers.MPNetConfig, transformers.MPNetModel, {"add_pooling_layer": False}),
               "modernbert": (transformers.ModernBertConfig, transformers.ModernBertModel, {})}
    cfg_cls, model_cls, kw = classes[kind]
    with torch.device("meta"):
        ref_model = model_cls(cfg_cls(**{k: v for k, v in hf.items() if k != "model_type"}), **kw)
    ref = sum(p.numel() for p in ref_model.parameters())   # a shared tensor (T5's embedding) counted once
    assert ours == ref, (name, ours, ref)
    assert abs(ours / 1e6 - published_m) / published_m < 0.01, (name, ours)


def test_router_folder_loads_as_two_towers_and_saves_back(tmp_path):
    """sentence-transformers' Router (asymmetric query / document modules, `Router.for_query_document`):
    embedjax reads it as separate towers, its query / document encodings equal `encode_query` /
    `encode_document`, and what embedjax writes is a Router that sentence-transformers reads back alike. A Router
    whose routes differ in head is refused with the file and what differs."""
    from sentence_transformers.base.modules import Dense, Router
    from sentence_transformers.sentence_transformer import modules

    from embedjax import Encoder
    from embedjax.models.convert import ModelLoadError

    tok = _bpe_tokenizer(tmp_path / "tok")
    routes = {}
    for seed, name in ((0, "query"), (1, "document")):
        torch.manual_seed(seed)
        model = _tiny("roberta")
        (tmp_path / name).mkdir()
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
        t = modules.Transformer(str(tmp_path / name), max_seq_length=48)
        torch.manual_seed(seed + 10)
        routes[name] = [t, modules.Pooling(32, "cls"), Dense(32, 16), modules.Normalize()]
    ref_model = st.SentenceTransformer(modules=[Router.for_query_document(routes["query"], routes["document"])],
                                       device="cpu")
    folder = tmp_path / "router"
    ref_model.save(str(folder))
    ref_q = ref_model.encode_query(TEXTS, convert_to_numpy=True)
    ref_d = ref_model.encode_document(TEXTS, convert_to_numpy=True)
    assert np.abs(ref_q - ref_d).max() > 1e-2     # the towers differ

    enc = Encoder.load(folder)
    assert not enc.config.shared_towers and enc.config.head.projection_dim == 16 and enc.max_length == 48
    assert np.abs(enc.encode(TEXTS, tower="query") - ref_q).max() <= 1e-5
    assert np.abs(enc.encode(TEXTS, tower="document") - ref_d).max() <= 1e-5

    back = enc.save(tmp_path / "ours")
    assert json.loads((back / "modules.json").read_text())[0]["type"].endswith("Router")
    again = st.SentenceTransformer(str(back), device="cpu")
    assert np.abs(again.encode_query(TEXTS, convert_to_numpy=True) - ref_q).max() <= 1e-5
    assert np.abs(again.encode_document(TEXTS, convert_to_numpy=True) - ref_d).max() <= 1e-5

    # routes that differ in more than weights: refused, naming the file and the difference
    routes["document"] = [routes["document"][0], modules.Pooling(32, "mean")]
    other = tmp_path / "router_mixed"
    st.SentenceTransformer(modules=[Router.for_query_document(routes["query"], routes["document"])],
                           device="cpu").save(str(other))
    with pytest.raises(ModelLoadError, match=r"router_config.json: the query and document routes differ in their "
                                             r"head"):
        Encoder.load(other)


def test_default_prompt_name_is_honoured_as_sentence_transformers_does(tmp_path, tiny_bert_dir):
    """config_sentence_transformers.json's `default_prompt_name`: `encode` without a prompt applies that prompt,
    queries and documents get it where the model has no "query" / "document" prompt, as in sentence-transformers;
    embedjax writes it back; a default naming no prompt is refused with the file."""
    from embedjax import Encoder
    from embedjax.models.convert import ModelLoadError

    folder = tmp_path / "prompted"
    ref_model = st.SentenceTransformer(str(tiny_bert_dir), device="cpu",
                                       prompts={"classification": "Classify this: ", "query": "query: "},
                                       default_prompt_name="classification")
    ref_model.save(str(folder))
    texts = TEXTS[:4]
    enc = Encoder.load(folder)
    assert enc.default_prompt_name == "classification"
    plain = Encoder.load(tiny_bert_dir)
    assert np.abs(enc.encode(texts) - ref_model.encode(texts, convert_to_numpy=True)).max() <= 1e-5
    assert np.abs(enc.encode(texts) - plain.encode(["Classify this: " + t for t in texts])).max() <= 1e-6
    assert np.abs(enc.encode_queries(texts) - ref_model.encode_query(texts, convert_to_numpy=True)).max() <= 1e-5
    assert np.abs(enc.encode_documents(texts)
                  - ref_model.encode_document(texts, convert_to_numpy=True)).max() <= 1e-5
    assert np.abs(enc.encode(texts, prompt_name="query") - plain.encode(["query: " + t for t in texts])).max() <= 1e-6

    back = enc.save(tmp_path / "back")
    cfg = json.loads((back / "config_sentence_transformers.json").read_text())
    assert cfg["default_prompt_name"] == "classification" and cfg["prompts"]["classification"] == "Classify this: "
    again = st.SentenceTransformer(str(back), device="cpu")
    assert np.abs(again.encode(texts, convert_to_numpy=True) - enc.encode(texts)).max() <= 1e-5

    cfg["default_prompt_name"] = "clustering"
    (back / "config_sentence_transformers.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="config_sentence_transformers.json: default_prompt_name 'clustering'"):
        Encoder.load(back)
