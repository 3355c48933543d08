"""Decoder-LLM backbones (Qwen3, Gemma 3 text): tiny random models built with transformers 5's PyTorch classes agree
with embedjax's `DecoderEncoder` after loading (float32, eval, |diff| <= 1e-5 at every real token), padded on the
right or on the left, causal or bidirectional, Gemma 3's sliding layers over inputs longer than the window; the
pooled embeddings (mean, lasttoken) agree with sentence-transformers' Pooling on transformers' states; weights
and configs go back to transformers unchanged; sentence-transformers folders load and save both ways; the
parameter counts of published configurations equal transformers'; and the latent-attention head (NV-Embed) pools
without seeing padding and trains.

Oracles: transformers' models called as sentence-transformers calls them, `model(input_ids, attention_mask)`
(default positions 0 .. L-1, whatever the padding). Bidirectional Qwen3 is transformers' own `is_causal=False`
config (its masking_utils then builds bidirectional masks, sliding windows |i - j| <= W); bidirectional Gemma 3 is
`use_bidirectional_attention=True` (EmbeddingGemma's flag)."""
import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
st = pytest.importorskip("sentence_transformers")

V = 300
_FULL, _SLIDING = "full_attention", "sliding_attention"
# Qwen3 with sliding windows (transformers' use_sliding_window: layers from max_window_layers on) and biases
QWEN_SLIDING = dict(use_sliding_window=True, sliding_window=3, max_window_layers=1, attention_bias=True)
LENGTHS = (12, 9, 5, 1, 0)     # a row of padding only too: the Encoder fills a batch with such rows
TEXTS = ["a short one", "a rather longer sentence with several more words in it to pad the others",
         "tokens, punctuation; and UNUSUAL casing!", "x",
         " ".join(["the words of a text longer than the 48-token limit, which both sides must cut alike"] * 4)]


def _hf_config(kind: str, attention: str = "causal", **over):
    if kind == "qwen3":   # head_dim 16 != hidden / heads; 4 query heads share 2 key / value heads
        kw = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=0,
                  rope_parameters={"rope_type": "default", "rope_theta": 500.0})
        if attention == "bidirectional":
            kw["is_causal"] = False
        kw.update(over)
        return transformers.Qwen3Config(**kw)
    # Gemma 3: sliding, full, sliding, sliding layers with a window of 5 (12-token inputs exceed it), one key /
    # value head for 4 query heads, query_pre_attn_scalar != head_dim, a rotary base per layer type
    kw = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=1, head_dim=16, max_position_embeddings=64, sliding_window=5,
              layer_types=[_SLIDING, _FULL, _SLIDING, _SLIDING], query_pre_attn_scalar=12, pad_token_id=0,
              eos_token_id=1, bos_token_id=2, use_bidirectional_attention=attention == "bidirectional",
              rope_parameters={_FULL: {"rope_type": "default", "rope_theta": 1000.0},
                               _SLIDING: {"rope_type": "default", "rope_theta": 50.0}})
    kw.update(over)
    return transformers.Gemma3TextConfig(**kw)


def _hf_model(kind: str, attention: str = "causal", lm: bool = False, **over):
    torch.manual_seed(0)
    cls = {("qwen3", False): transformers.Qwen3Model, ("qwen3", True): transformers.Qwen3ForCausalLM,
           ("gemma3", False): transformers.Gemma3TextModel, ("gemma3", True): transformers.Gemma3ForCausalLM}
    model = cls[kind, lm](_hf_config(kind, attention, **over)).eval()
    with torch.no_grad():   # norm weights away from their initial 1 (Qwen3) / 0 (Gemma: 1 + w), biases non-zero
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0 if kind == "gemma3" else 1.0, 0.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def _batch(side: str, L: int = 12):
    rng = np.random.default_rng(1)
    ids = rng.integers(3, V, size=(len(LENGTHS), L))
    mask = np.zeros_like(ids)
    for i, n in enumerate(LENGTHS):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, L - n:] = 1
    ids[mask == 0] = 0
    return ids, mask


def _st_pool(mode: str, hidden, mask) -> np.ndarray:
    from sentence_transformers.sentence_transformer.modules import Pooling

    out = Pooling(hidden.shape[-1], mode)({"token_embeddings": hidden, "attention_mask": torch.tensor(mask)})
    return out["sentence_embedding"].numpy()


CASES = {"qwen3-causal": ("qwen3", "causal", {}), "qwen3-bidirectional": ("qwen3", "bidirectional", {}),
         "qwen3-sliding-causal": ("qwen3", "causal", QWEN_SLIDING),
         "qwen3-sliding-bidirectional": ("qwen3", "bidirectional", QWEN_SLIDING),
         "gemma3-causal": ("gemma3", "causal", {}), "gemma3-bidirectional": ("gemma3", "bidirectional", {})}


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("case", list(CASES))
def test_hidden_states_and_pooling_match_transformers(tmp_path, case, side):
    from embedjax.models.convert import load_folder
    from embedjax.models.decoder import DecoderEncoder
    from embedjax.models.dual_encoder import DualEncoder, HeadConfig

    kind, attention, over = CASES[case]
    model = _hf_model(kind, attention, **over)
    model.save_pretrained(tmp_path)
    ids, mask = _batch(side)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), use_cache=False).last_hidden_state
    cfg, params, _, _ = load_folder(tmp_path)
    enc = cfg.encoder
    assert cfg.architecture == "decoder" and enc.attention == attention and cfg.head.pooling == "mean"
    if kind == "gemma3":
        # config.json's window: 5, or, bidirectional, 4: transformers keeps 5 // 2 + 1 = 3 and writes (3 - 1) * 2
        assert enc.layer_types == (_SLIDING, _FULL, _SLIDING, _SLIDING)
        assert enc.sliding_window == (5 if attention == "causal" else 4)
        assert enc.window == (4 if attention == "causal" else 2)   # keys i-4 .. i, or |i - j| <= 2
        assert (enc.rope_theta, enc.rope_local_theta, enc.query_pre_attn_scalar) == (1000.0, 50.0, 12.0)
    elif over:
        assert enc.layer_types == (_FULL, _SLIDING) and enc.window == (2 if attention == "causal" else 3)
    ids32, mask32 = ids.astype(np.int32), mask.astype(np.int32)
    ours = np.asarray(DecoderEncoder(enc).apply({"params": params["tower"]["encoder"]}, ids32, mask32))
    assert np.isfinite(ours).all()   # padding too: rows whose keys are all masked (left padding, causal)
    valid = mask.astype(bool)
    assert np.abs(ours[valid] - ref.numpy()[valid]).max() <= 1e-5
    for pooling in ("mean", "lasttoken"):
        pooled = dataclasses.replace(cfg, head=HeadConfig(pooling=pooling, normalize=False))
        emb = np.asarray(DualEncoder(pooled).apply({"params": params}, ids32, mask32))
        want = _st_pool(pooling, ref, mask)
        assert np.abs(emb - want).max() <= 1e-5, pooling
        assert not emb[-1].any()         # the row of padding only pools to zeros, as sentence-transformers'


def test_lasttoken_is_each_rows_last_real_token_on_either_side():
    import jax.numpy as jnp

    from embedjax.models.dual_encoder import pool

    h = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3) + 1
    right = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = jnp.asarray([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(pool(h, right, "lasttoken"), np.stack([h[0, 2], h[1, 4]]))
    np.testing.assert_array_equal(pool(h, left, "lasttoken"), np.stack([h[0, 4], np.zeros(3)]))
    for mask in (right, left):
        np.testing.assert_array_equal(pool(h, mask, "lasttoken"), _st_pool("lasttoken", torch.tensor(np.asarray(h)),
                                                                            np.asarray(mask)))


@pytest.mark.parametrize("kind", ["qwen3", "gemma3"])
def test_causal_lm_checkpoint_loads_and_weights_go_back_unchanged(tmp_path, kind):
    """A *ForCausalLM checkpoint ("model." prefix, an lm_head) loads, the lm_head left out; what embedjax writes
    back is the base model's tensors, bit for bit; scanned (Qwen3) and rematerialised layers compute the same."""
    from safetensors import safe_open

    from embedjax.models.convert import load_folder, tower_params_to_hf, hf_to_tower_params, read_safetensors
    from embedjax.models.decoder import DecoderEncoder

    model = _hf_model(kind, lm=True, tie_word_embeddings=False, **(QWEN_SLIDING if kind == "qwen3" else {}))
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
        keys = set(f.keys())
    assert "lm_head.weight" in keys and all(k.startswith("model.") for k in keys - {"lm_head.weight"})
    cfg, params, _, _ = load_folder(tmp_path)
    assert cfg.head.pooling == "lasttoken"   # sentence-transformers' choice for a plain causal-LM folder
    back = tower_params_to_hf(cfg, params["tower"])
    want = {k: v.numpy() for k, v in model.model.state_dict().items()}
    assert set(back) == set(want)
    for k in want:
        assert np.array_equal(back[k], want[k]), k

    ids, mask = _batch("left")
    ids32, mask32 = ids.astype(np.int32), mask.astype(np.int32)
    base = np.asarray(DecoderEncoder(cfg.encoder).apply({"params": params["tower"]["encoder"]}, ids32, mask32))
    variants = [dict(remat="full")]
    if kind == "qwen3":
        with pytest.raises(ValueError, match="scan_layers is not supported for a decoder whose layers differ"):
            dataclasses.replace(cfg.encoder, scan_layers=True)
        variants.append(dict(scan_layers=True, layer_types=(_FULL, _FULL)))   # one type: scannable
    for kw in variants:
        enc = dataclasses.replace(cfg.encoder, **kw)
        c = dataclasses.replace(cfg, encoder=enc)
        tower = hf_to_tower_params(c, read_safetensors(tmp_path), "model.safetensors")
        if enc.scan_layers:
            assert tower["encoder"]["layers"]["query"]["kernel"].shape == (2, 32, 64)
            for k, v in tower_params_to_hf(c, tower).items():
                assert np.array_equal(v, want[k]), k
            plain = dataclasses.replace(cfg.encoder, layer_types=(_FULL, _FULL))
            base = np.asarray(DecoderEncoder(plain).apply({"params": params["tower"]["encoder"]}, ids32, mask32))
        out = np.asarray(DecoderEncoder(enc).apply({"params": tower["encoder"]}, ids32, mask32))
        assert np.abs(out - base).max() <= 1e-6, kw


@pytest.mark.parametrize("case", ["qwen3-causal", "qwen3-sliding-bidirectional", "gemma3-causal",
                                  "gemma3-bidirectional"])
def test_config_goes_back_to_the_same_transformers_model(tmp_path, case):
    """from_hf(config) -> to_hf() -> transformers builds a model that computes what the original did (Gemma 3's
    bidirectional window, which transformers halves when it reads the config, included)."""
    from embedjax.models.decoder import DecoderConfig

    kind, attention, over = CASES[case]
    model = _hf_model(kind, attention, **over)
    cfg = DecoderConfig.from_hf(model.config.to_dict())
    assert DecoderConfig.from_hf(cfg.to_hf()) == cfg
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    again = transformers.AutoModel.from_pretrained(tmp_path).eval()
    assert type(again) is type(model) and again.config.sliding_window == model.config.sliding_window
    ids, mask = _batch("right")
    with torch.no_grad():
        a, b = (m(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), use_cache=False).last_hidden_state
                for m in (model, again))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind,change,message", [
    ("qwen3", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ("qwen3", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}},
     "rope_parameters: rope_type 'linear' is not supported"),
    ("qwen3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "rope_parameters: partial_rotary_factor not supported"),
    ("qwen3", {"use_sliding_window": False, "layer_types": [_FULL, _SLIDING]}, "use_sliding_window is false"),
    ("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping 50.0 is not supported"),
    ("gemma3", {"rope_scaling": {"rope_type": "linear", "factor": 8.0}}, "rope_scaling"),
    ("gemma3", {"is_causal": False}, "is_causal=false on gemma3_text"),
    ("gemma3", {"rope_parameters": {_FULL: {"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0},
                                    _SLIDING: {"rope_type": "default", "rope_theta": 1e4}}},
     "rope_parameters.full_attention: rope_type 'yarn'"),
    ("gemma3", {"query_pre_attn_scalar": None}, "query_pre_attn_scalar is null"),
])
def test_settings_that_change_the_computation_and_are_not_implemented_are_refused(kind, change, message):
    from embedjax.models.decoder import DecoderConfig

    cfg = {**_hf_config(kind).to_dict(), **change}
    with pytest.raises(ValueError, match=message):
        DecoderConfig.from_hf(cfg)


def _tokenizer(kind: str, padding_side: str):
    """A byte-level BPE tokenizer trained here: "<pad>" 0, "<eos>" 1, "<bos>" 2; Qwen3-Embedding's framing (an
    end-of-text token appended, the one lasttoken pools) or Gemma's (a beginning-of-text token in front)."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import TemplateProcessing

    words = " ".join(TEXTS) + " the of and to in is was for on with as by at from this that"
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([words] * 20, vocab_size=V, min_frequency=1, special_tokens=["<pad>", "<eos>", "<bos>"])
    bpe._tokenizer.post_processor = (TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 1)])
                                     if kind == "qwen3" else
                                     TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)]))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<bos>", eos_token="<eos>",
                                               pad_token="<pad>", padding_side=padding_side,
                                               model_input_names=["input_ids", "attention_mask"])
    ids = tok("a short one")["input_ids"]
    assert len(ids) > 3 and (ids[-1] == 1 if kind == "qwen3" else ids[0] == 2) and len(tok) <= V, ids
    return tok


@pytest.mark.parametrize("kind,padding_side", [("qwen3", "left"), ("qwen3", "right"), ("gemma3", "right")])
def test_sentence_transformers_folders_load_and_save_both_ways(tmp_path, kind, padding_side):
    """Qwen3 (a *ForCausalLM checkpoint, as Qwen3-Embedding ships): Transformer + Pooling(lasttoken) + Normalize,
    its tokenizer padding on the left (Qwen3-Embedding's) or the right; Gemma 3 bidirectional (EmbeddingGemma's
    attention) with mean pooling. embedjax's Encoder (which pads on the right: rotary attention depends only on
    distances, so a text's states do not depend on the side) gives sentence-transformers' embeddings; what it
    saves, sentence-transformers reads back alike; a plain Hugging Face folder loads as sentence-transformers
    loads it (lasttoken for a causal LM, mean otherwise, no normalisation)."""
    from sentence_transformers.sentence_transformer import modules

    from embedjax import Encoder

    attention = "causal" if kind == "qwen3" else "bidirectional"
    model = _hf_model(kind, attention, lm=kind == "qwen3")
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    _tokenizer(kind, padding_side).save_pretrained(hf_dir)

    plain_ref = st.SentenceTransformer(str(hf_dir), device="cpu").encode(TEXTS, convert_to_numpy=True)
    plain = Encoder.load(hf_dir)
    assert plain.config.head.pooling == ("lasttoken" if kind == "qwen3" else "mean") and not plain.config.head.normalize
    assert np.abs(plain.encode(TEXTS) - plain_ref).max() <= 1e-5

    transformer = modules.Transformer(str(hf_dir), max_seq_length=48)
    assert transformer.tokenizer.padding_side == padding_side
    pooling = modules.Pooling(32, "lasttoken" if kind == "qwen3" else "mean")
    ref_model = st.SentenceTransformer(modules=[transformer, pooling, modules.Normalize()], device="cpu")
    folder = tmp_path / "st"
    ref_model.save(str(folder))
    ref = ref_model.encode(TEXTS, convert_to_numpy=True)

    enc = Encoder.load(folder)
    assert enc.config.architecture == "decoder" and enc.config.encoder.attention == attention
    assert enc.config.head.pooling == pooling.pooling_mode and enc.max_length == 48
    ours = enc.encode(TEXTS)
    assert np.abs(ours - ref).max() <= 1e-5
    back = enc.save(tmp_path / "ours")
    again = st.SentenceTransformer(str(back), device="cpu").encode(TEXTS, convert_to_numpy=True)
    assert np.abs(again - ref).max() <= 1e-5
    # the pooling as sentence-transformers 6.x reads it; the weights in the base model's layout
    assert st.SentenceTransformer(str(back), device="cpu")[1].pooling_mode == pooling.pooling_mode
    from safetensors import safe_open
    with safe_open(str(back / "model.safetensors"), framework="numpy") as f:
        assert "embed_tokens.weight" in set(f.keys())


# Published configurations (the values of their config.json files; EmbeddingGemma's text model). embedjax's
# parameter count equals that of transformers' base model built from the same config on torch's meta device (no
# memory; no LM head, which all three tie to the embeddings), and the published figures (count, unit): Qwen3-0.6B's
# model card "0.6B parameters, 0.44B non-embedding"; the Gemma 3 report's 1B "302M embedding, 698M
# non-embedding"; EmbeddingGemma's "308M parameters: ~100M model, ~200M embedding", the 308M counting its two
# Dense layers (768 -> 3072 -> 768, no bias) after the 303M transformer.
FULL_SIZE = {
    "Qwen/Qwen3-0.6B": (dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                             num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                             max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000,
                             tie_word_embeddings=True, use_sliding_window=False, sliding_window=None,
                             max_window_layers=28, attention_bias=False, hidden_act="silu", bos_token_id=151643,
                             eos_token_id=151645),
                        596_049_920, {"total": (6, 1e8), "non_embedding": (44, 1e7)}),
    "google/gemma-3-1b-pt": (dict(model_type="gemma3_text", vocab_size=262144, hidden_size=1152,
                                  intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                                  num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
                                  sliding_window_pattern=6, rope_theta=1000000, rope_local_base_freq=10000,
                                  max_position_embeddings=32768, rms_norm_eps=1e-6, rope_scaling=None,
                                  attn_logit_softcapping=None, final_logit_softcapping=None,
                                  hidden_activation="gelu_pytorch_tanh"),
                             999_885_952, {"total": (1, 1e9), "embedding": (302, 1e6), "non_embedding": (698, 1e6)}),
    "google/embeddinggemma-300m": (dict(model_type="gemma3_text", vocab_size=262144, hidden_size=768,
                                        intermediate_size=1152, num_hidden_layers=24, num_attention_heads=3,
                                        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                                        sliding_window=512, rope_theta=1000000, rope_local_base_freq=10000,
                                        max_position_embeddings=2048, use_bidirectional_attention=True,
                                        rms_norm_eps=1e-6, rope_scaling=None, attn_logit_softcapping=None,
                                        final_logit_softcapping=None, hidden_activation="gelu_pytorch_tanh"),
                                   302_863_104, {"total": (303, 1e6), "with_dense": (308, 1e6),
                                                 "non_embedding": (1, 1e8), "embedding": (2, 1e8)}),
}


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_parameter_counts(name):
    import jax

    from embedjax.models.convert import encoder_config_from_hf
    from embedjax.models.dual_encoder import HeadConfig, ModelConfig, init_params

    hf, exact, published = FULL_SIZE[name]
    arch, enc = encoder_config_from_hf(hf, name)
    assert arch == "decoder"
    if "embeddinggemma" in name:
        assert enc.attention == "bidirectional" and enc.window == 256
    cfg = ModelConfig(arch, enc, HeadConfig(normalize=False), max_length=128)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    cfg_cls, model_cls = ((transformers.Qwen3Config, transformers.Qwen3Model) if hf["model_type"] == "qwen3" else
                          (transformers.Gemma3TextConfig, transformers.Gemma3TextModel))
    with torch.device("meta"):
        ref_model = model_cls(cfg_cls(**{k: v for k, v in hf.items() if k != "model_type"}))
    assert ours == sum(p.numel() for p in ref_model.parameters()) == exact, (name, ours)
    embedding = enc.vocab_size * enc.hidden_size
    counts = {"total": ours, "embedding": embedding, "non_embedding": ours - embedding,
              "with_dense": ours + 2 * enc.hidden_size * 3072}
    for what, (figure, unit) in published.items():
        assert round(counts[what] / unit) == figure, (name, what, counts[what])


@pytest.mark.parametrize("kind", ["qwen3", "gemma3"])
def test_exit_states_equal_the_truncated_decoder(kind):
    """2D Matryoshka: the states after fewer layers, in the same pass, are what the decoder cut to that many layers
    computes (Gemma 3: the cut keeps the first layers' types)."""
    import jax

    from embedjax.models.decoder import DecoderConfig
    from embedjax.models.dual_encoder import DualEncoder, HeadConfig, ModelConfig, init_params, split_exits
    from embedjax.models.dual_encoder import truncate_layers

    enc = DecoderConfig.from_hf(_hf_config(kind, "causal", num_hidden_layers=4, **(
        {"layer_types": [_SLIDING, _FULL, _SLIDING, _SLIDING]} if kind == "gemma3" else {})).to_dict())
    cfg = ModelConfig("decoder", enc, HeadConfig(pooling="lasttoken", normalize=True), max_length=16)
    params = jax.jit(lambda key: init_params(cfg, key))(jax.random.key(1))   # jitted: eager init is slow
    ids, mask = _batch("left")

    def run(c, p, exits=()):
        return jax.jit(lambda p: DualEncoder(c).apply({"params": p}, ids, mask, exit_layers=exits))(p)
    full, after1, after3 = split_exits(run(cfg, params, (1, 3)), 2)
    np.testing.assert_allclose(full, run(cfg, params), atol=1e-6)
    for n, part in ((1, after1), (3, after3)):
        sub_cfg, sub_params = truncate_layers(cfg, params, n)
        assert sub_cfg.encoder.layer_types == enc.layer_types[:n]
        np.testing.assert_allclose(part, run(sub_cfg, sub_params), atol=1e-6)
        assert np.abs(np.asarray(part[:-1]) - np.asarray(full[:-1])).max() > 1e-3   # another network


def _latent_cfg(**head):
    from embedjax.models.decoder import DecoderConfig
    from embedjax.models.dual_encoder import HeadConfig, ModelConfig

    enc = DecoderConfig.from_hf(_hf_config("qwen3").to_dict())
    return ModelConfig("decoder", enc, HeadConfig(pooling="latent_attention", normalize=False,
                                                  **{"latent_num": 8, "latent_heads": 4, **head}), max_length=16)


def test_latent_attention_head_pools_without_seeing_padding_and_trains():
    import jax
    import jax.numpy as jnp

    from embedjax.models.dual_encoder import DualEncoder, LatentAttentionPooling, init_params

    cfg = _latent_cfg(latent_mlp_dim=24)
    params = jax.jit(lambda key: init_params(cfg, key))(jax.random.key(0))
    la = params["tower"]["latent_attention"]
    assert la["latents"].shape == (8, 32) and la["wi"]["kernel"].shape == (32, 24)
    assert la["query"]["kernel"].shape == la["key"]["kernel"].shape == (32, 32)
    # logical axes on every parameter of the head
    boxed = jax.eval_shape(lambda: DualEncoder(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32),
                                                         jnp.ones((1, 8), jnp.int32), method=DualEncoder.init_both))
    names = {jax.tree_util.keystr(p): leaf.names for p, leaf in jax.tree_util.tree_flatten_with_path(
        boxed["params"]["tower"]["latent_attention"], is_leaf=lambda x: hasattr(x, "names"))[0]}
    assert names["['latents']"] == ("latents", "embed") and names["['query']['kernel']"] == ("embed", "heads")
    assert all(n for n in names.values())

    apply = jax.jit(LatentAttentionPooling(cfg.head).apply)
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((3, 7, 32)), jnp.float32)
    mask = jnp.asarray([[1] * 7, [1] * 4 + [0] * 3, [0] * 5 + [1] * 2])
    out = apply({"params": la}, hidden, mask)
    assert out.shape == (3, 32) and np.isfinite(np.asarray(out)).all()
    junk = jnp.where(mask[..., None] > 0, hidden, 1e3 * jnp.asarray(rng.standard_normal((3, 7, 32)), jnp.float32))
    np.testing.assert_allclose(apply({"params": la}, junk, mask), out, atol=1e-6)   # padding is not seen
    np.testing.assert_allclose(apply({"params": la}, hidden[1:2, :4], mask[1:2, :4]), out[1:2], atol=1e-6)
    np.testing.assert_allclose(apply({"params": la}, hidden[2:, 5:], mask[2:, 5:]), out[2:], atol=1e-6)
    # the head is not mean pooling, and it depends on the latents
    mean = (hidden * mask[..., None]).sum(1) / mask.sum(1)[:, None]
    assert np.abs(np.asarray(out - mean)).max() > 1e-3
    other = dict(la, latents=la["latents"] + jnp.asarray(rng.standard_normal((8, 32)), jnp.float32))
    assert np.abs(np.asarray(apply({"params": other}, hidden, mask) - out)).max() > 1e-4

    ids = jnp.asarray(rng.integers(3, V, size=(2, 6)), jnp.int32)
    ids_mask = jnp.asarray([[1] * 6, [1] * 3 + [0] * 3], jnp.int32)

    def loss(p):
        return jnp.sum(jnp.sin(DualEncoder(cfg).apply({"params": p}, ids, ids_mask)))
    grads = jax.jit(jax.grad(loss))(params)
    for path in (("latent_attention", "latents"), ("latent_attention", "wo", "kernel"),
                 ("encoder", "layer_0", "query", "kernel"), ("encoder", "token_embedder", "embedding")):
        g = grads["tower"]
        for k in path:
            g = g[k]
        assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0, path


def test_latent_attention_settings_are_checked_and_saving_it_is_refused(tmp_path):
    import jax

    from embedjax.errors import ExportError
    from embedjax.models.convert import save_sentence_transformers
    from embedjax.models.dual_encoder import HeadConfig, ModelConfig, init_params

    with pytest.raises(ValueError, match="latent_heads 5 does not divide the encoder's hidden size 32"):
        _latent_cfg(latent_heads=5)
    with pytest.raises(ValueError, match="latent_num must be a positive integer"):
        HeadConfig(pooling="latent_attention", latent_num=0)
    with pytest.raises(ValueError, match="latent_heads is a setting of pooling 'latent_attention', not of 'mean'"):
        HeadConfig(pooling="mean", latent_heads=4)
    cfg = _latent_cfg()
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert "latent_num" not in dataclasses.replace(cfg, head=HeadConfig()).to_dict()["head"]
    with pytest.raises(ExportError, match="pooling 'latent_attention' has no sentence-transformers module"):
        save_sentence_transformers(tmp_path / "out", cfg, jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))), None)
    assert not (tmp_path / "out").exists()


def test_a_new_latent_attention_head_on_a_pretrained_decoder_starts_fresh(tmp_path):
    """init_from a checkpoint without the head plus model_config.head: the decoder's weights are the pretrained
    ones, the head is initialised by its own initialisers (as a new projection is), and every weight, the head's
    included, is placed on the mesh by the logical-axis rules (tensor-parallel heads, fsdp embed)."""
    import jax

    from embedjax import sharding
    from embedjax.config import load_config
    from embedjax.experiment import assemble
    from embedjax.models.convert import load_folder
    from embedjax.models.source import resolve

    folder = tmp_path / "qwen"
    _hf_model("qwen3", lm=True).save_pretrained(folder)
    _tokenizer("qwen3", "left").save_pretrained(folder)
    cfg = load_config("configs/tiny.py", [f"init_from='{folder}'", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    cfg.model_config = {"head": {"pooling": "latent_attention", "latent_num": 8, "latent_heads": 4}}
    src = resolve(cfg)
    assert src.config.architecture == "decoder" and src.config.head.pooling == "latent_attention"
    exp = assemble(cfg, sharding.make_mesh(dict(cfg.mesh)))
    state, _ = exp.create_state(src.config, jax.random.key(0), pretrained=src.params)
    tower = state.params["model"]["tower"]
    pre = load_folder(folder)[1]["tower"]["encoder"]
    for a, b in zip(jax.tree.leaves(tower["encoder"]), jax.tree.leaves(pre)):
        np.testing.assert_array_equal(np.asarray(a), b)
    latents = tower["latent_attention"]["latents"]
    assert latents.shape == (8, 32) and 0.5 < float(np.std(np.asarray(latents))) < 2   # normal(1.0) init
    spec = tower["encoder"]["layer_0"]["key"]["kernel"].sharding.spec      # [embed, kv heads * head_dim]
    assert tuple(spec) == ("fsdp", "tensor"), spec
    assert tuple(latents.sharding.spec) == (None, "fsdp"), latents.sharding.spec   # [latents, embed]
