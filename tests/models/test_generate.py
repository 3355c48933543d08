"""Generation and scoring with the decoder LLMs (`embedjax.generate`) against transformers 5's PyTorch models:
tiny random Qwen3ForCausalLM (untied LM head, attention biases) and Gemma3ForCausalLM (tied head, sliding
window of 4 tokens, final_logit_softcapping), float32, eval, prompts of several lengths in one left-padded batch.

- greedy tokens equal `model.generate(do_sample=False)` token for token (Gemma 3: prompts + new tokens longer
  than the window; generating without the window gives other tokens, so the window is exercised);
- EOS and stop sequences end a row where transformers' generate (same eos_token_id) / the unstopped greedy run
  says, and the text is cut before them;
- log-likelihoods of continuations, next-token log-probabilities and the yes-probability equal the PyTorch
  model's log_softmax, gathered (|diff| <= 1e-4); Gemma 3's logit soft-capping changes them (it is applied);
- sampling is reproducible from the seed, differs across seeds, does not depend on the batch size, equals greedy
  with a tiny top_p, follows softmax(logits / T) (restricted to the nucleus with top_p) over 1024 draws, and the
  nucleus filter equals transformers' TopPLogitsWarper;
- on 8 fake devices (data=4, fsdp=2: parameters sharded) generation and scores equal one device's;
- prompts of different lengths in one bucket reuse one compiled program."""
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _llm  # noqa: E402

V = _llm.V
_FULL, _SLIDING = "full_attention", "sliding_attention"
PROMPTS = ["the cell", "a rather longer prompt about proteins and the expression of genes in mice",
           "x", "patients treated with"]
WINDOW = 4


def _hf_model(kind: str, **over):
    torch.manual_seed(0)
    if kind == "qwen3":
        kw = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
                  bos_token_id=2, tie_word_embeddings=False, attention_bias=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 500.0})
        kw.update(over)
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kw))
    else:
        kw = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=16, max_position_embeddings=128, sliding_window=WINDOW,
                  layer_types=[_SLIDING, _FULL, _SLIDING], query_pre_attn_scalar=12, pad_token_id=0,
                  eos_token_id=1, bos_token_id=2, final_logit_softcapping=0.5,
                  rope_parameters={_FULL: {"rope_type": "default", "rope_theta": 1000.0},
                                   _SLIDING: {"rope_type": "default", "rope_theta": 50.0}})
        kw.update(over)
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**kw))
    model.eval()
    with torch.no_grad():   # norm weights away from their initial 1 (Qwen3) / 0 (Gemma: 1 + w), biases non-zero
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0 if kind == "gemma3" else 1.0, 0.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return _llm.tokenizer("gemma3")   # "<bos>" in front of every prompt


@pytest.fixture(scope="module", params=["qwen3", "gemma3"])
def lm(request, tmp_path_factory, tokenizer):
    """(kind, transformers model, folder, embedjax config, params, tokenizer as loaded)."""
    from embedjax.models.convert import load_lm

    kind = request.param
    model = _hf_model(kind)
    folder = tmp_path_factory.mktemp(kind)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    cfg, params, tok = load_lm(folder)
    return kind, model, folder, cfg, params, tok


def _generator(lm, **kw):
    from embedjax.generate import Generator

    _, _, _, cfg, params, tok = lm
    return Generator(kw.pop("config", cfg), params, tok, max_prompt_length=kw.pop("max_prompt_length", 32), **kw)


def _hf_generate(model, tokenizer, prompts, logprobs: bool = False, **kw):
    """transformers' new tokens per prompt (left-padded batch), through the first EOS (and, `logprobs`, the
    log_softmax of its logits at each of them)."""
    enc = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                             output_logits=True, **kw)
    eos = kw.get("eos_token_id", 1)
    rows, logps = [], []
    new = out.sequences[:, enc["input_ids"].shape[1]:]
    logp = torch.log_softmax(torch.stack(out.logits, dim=1).double(), dim=-1)
    for i, row in enumerate(new.tolist()):
        n = row.index(eos) + 1 if eos in row else len(row)
        rows.append(row[:n])
        logps.append([float(logp[i, j, t]) for j, t in enumerate(row[:n])])
    return (rows, logps) if logprobs else rows


def test_load_lm_reads_the_head(lm):
    kind, model, _, cfg, params, _ = lm
    if kind == "qwen3":   # untied: lm_head.weight, transposed
        assert not cfg.tie_word_embeddings
        np.testing.assert_array_equal(params["lm_head"]["kernel"], model.lm_head.weight.detach().numpy().T)
    else:                 # tied: no lm_head of its own
        assert cfg.tie_word_embeddings and "lm_head" not in params and cfg.final_logit_softcapping == 0.5
    np.testing.assert_array_equal(params["decoder"]["token_embedder"]["embedding"],
                                  model.model.embed_tokens.weight.detach().numpy())


def test_greedy_equals_transformers_generate(lm, tokenizer):
    kind, model, _, cfg, _, _ = lm
    lengths = [len(x) for x in tokenizer(PROMPTS)["input_ids"]]
    assert len(set(lengths)) == len(PROMPTS)   # every prompt padded differently
    want, want_logp = _hf_generate(model, tokenizer, PROMPTS, logprobs=True, max_new_tokens=8)
    gen = _generator(lm)
    for batch_size in (4, 3):   # one batch; two batches, the second with padding rows
        got = gen.generate_tokens(PROMPTS, max_new_tokens=8, batch_size=batch_size)
        assert [g.token_ids for g in got] == want, batch_size
        # each step's distribution, not only its argmax: positions and caches exactly as transformers'
        assert max(abs(a - b) for g, w in zip(got, want_logp) for a, b in zip(g.logprobs, w)) <= 1e-4
        for g, w in zip(got, want):
            assert g.finish_reason == ("eos" if w[-1] == 1 else "length")
            assert g.text == tokenizer.decode(w, skip_special_tokens=True)
    if kind == "gemma3":
        assert max(lengths) + 8 > 2 * WINDOW   # the window cuts the context of later tokens
        wide = _generator(lm, config=dataclasses.replace(cfg, sliding_window=128))
        assert [g.token_ids for g in wide.generate_tokens(PROMPTS, max_new_tokens=8)] != want


def test_eos_and_stop_sequences_end_rows(lm, tokenizer):
    _, model, _, _, _, _ = lm
    free = [g.token_ids for g in _generator(lm).generate_tokens(PROMPTS, max_new_tokens=8)]
    # EOS: a token row 0 generates first at step k >= 2, which ends row 0 there and every row at its first
    # occurrence
    k = next(k for k in range(2, 7) if free[0][k] not in free[0][:k])
    eos = free[0][k]
    got = _generator(lm, eos_token_ids=[eos]).generate_tokens(PROMPTS, max_new_tokens=8)
    assert [g.token_ids for g in got] == _hf_generate(model, tokenizer, PROMPTS, max_new_tokens=8,
                                                      eos_token_id=eos)
    assert got[0].token_ids == free[0][:k + 1] and got[0].finish_reason == "eos"
    assert got[0].text == tokenizer.decode(free[0][:k], skip_special_tokens=True)
    for g, f in zip(got, free):
        assert g.token_ids == (f[:f.index(eos) + 1] if eos in f else f)
    # stop: two consecutive tokens of row 1 (a pair whose text re-tokenizes to the same two tokens)
    k = next(k for k in range(1, 6) if tokenizer(tokenizer.decode(free[1][k:k + 2]),
                                                 add_special_tokens=False)["input_ids"] == free[1][k:k + 2])
    stop = tokenizer.decode(free[1][k:k + 2])
    got = _generator(lm).generate_tokens(PROMPTS, max_new_tokens=8, stop=[stop, "zzzz never"])
    assert got[1].token_ids == free[1][:k + 2] and got[1].finish_reason == "stop"
    assert got[1].text == tokenizer.decode(free[1][:k], skip_special_tokens=True)
    for g, f in zip(got, free):
        ends = [j + 2 for j in range(len(f) - 1) if f[j:j + 2] == free[1][k:k + 2]]
        assert g.token_ids == (f[:ends[0]] if ends else f)
    # a stop string inside a token (its own tokens never appear): the text is cut there, the tokens are not
    text = tokenizer.decode(free[2], skip_special_tokens=True)
    inner = next(text[i:i + 3] for i in range(1, len(text) - 3) if text[i:i + 3].strip() == text[i:i + 3]
                 and not _contains(free[2], tokenizer(text[i:i + 3], add_special_tokens=False)["input_ids"]))
    got = _generator(lm).generate_tokens(PROMPTS[2:3], max_new_tokens=8, stop=[inner])[0]
    assert got.token_ids == free[2] and got.finish_reason == "stop"
    assert got.text == text[:text.index(inner)] and len(got.text) < len(text)


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def _torch_logprobs(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1).numpy()


def test_scores_equal_torch_log_softmax(lm, tokenizer):
    kind, model, folder, cfg, params, _ = lm
    gen = _generator(lm)
    conts = [" of the cells", " is", " and not a protein of any kind in the", " was"]
    scores = gen.score_continuations(PROMPTS, conts, batch_size=4)
    want_sum, want_n = [], []
    for p, c in zip(PROMPTS, conts):
        head, tail = tokenizer(p)["input_ids"], tokenizer(c, add_special_tokens=False)["input_ids"]
        logp = _torch_logprobs(model, head + tail)
        want_sum.append(sum(logp[len(head) + j - 1, t] for j, t in enumerate(tail)))
        want_n.append(len(tail))
    assert np.abs(scores.sum - want_sum).max() <= 1e-4
    assert np.abs(scores.mean - np.asarray(want_sum) / want_n).max() <= 1e-4
    assert list(scores.num_tokens) == want_n and len(set(want_n)) > 2

    cand = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" is", " was", " not", " of")]
    nxt = gen.next_token_logprobs(PROMPTS, cand)
    last = np.stack([_torch_logprobs(model, tokenizer(p)["input_ids"])[-1, cand] for p in PROMPTS])
    assert np.abs(nxt - last).max() <= 1e-4
    p_yes = gen.yes_probability(PROMPTS, yes=[" is", " was"], no=[" not"])
    want = np.exp(np.logaddexp(last[:, 0], last[:, 1]))
    want = want / (want + np.exp(last[:, 2]))
    assert np.abs(p_yes - want).max() <= 1e-5
    with pytest.raises(ValueError, match="' yes' is 2 tokens"):
        gen.yes_probability(PROMPTS)   # the defaults are not single tokens in this small vocabulary
    with pytest.raises(ValueError, match="among both"):
        gen.yes_probability(PROMPTS, yes=[" is"], no=[" not", " is"])
    if kind == "gemma3":   # the soft-capping is applied (the scores without it differ)
        uncapped = _generator(lm, config=dataclasses.replace(cfg, final_logit_softcapping=None))
        assert np.abs(uncapped.score_continuations(PROMPTS, conts).sum - scores.sum).max() > 1e-2


def test_sampling_is_reproducible_and_top_p_tiny_is_greedy(lm):
    gen = _generator(lm)
    kw = dict(max_new_tokens=8, temperature=1.0)
    a = [g.token_ids for g in gen.generate_tokens(PROMPTS, seed=0, **kw)]
    assert a == [g.token_ids for g in gen.generate_tokens(PROMPTS, seed=0, **kw)]
    assert a == [g.token_ids for g in gen.generate_tokens(PROMPTS, seed=0, batch_size=2, **kw)]
    b = [g.token_ids for g in gen.generate_tokens(PROMPTS, seed=1, **kw)]
    assert all(x != y for x, y in zip(a, b))
    greedy = [g.token_ids for g in gen.generate_tokens(PROMPTS, max_new_tokens=8)]
    assert a != greedy
    assert [g.token_ids for g in gen.generate_tokens(PROMPTS, seed=3, top_p=1e-6, **kw)] == greedy


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_first_sampled_token_follows_softmax(lm, tokenizer, top_p):
    """1024 draws of the first new token (one prompt, 1024 rows, each with its own key) against
    softmax(logits / 0.02) of the PyTorch model, within the nucleus for top_p < 1: every token drawn is in the
    nucleus, and each frequency is within 5 standard deviations of its probability."""
    _, model, _, _, _, _ = lm
    T, n = 0.02, 1024
    logp = _torch_logprobs(model, tokenizer(PROMPTS[3])["input_ids"])[-1] / T
    prob = np.exp(logp - np.logaddexp.reduce(logp))
    order = np.argsort(-prob)
    keep = np.zeros(V, bool)
    keep[order[:max(1, int(np.searchsorted(np.cumsum(prob[order]), top_p) + 1))]] = True
    if top_p == 1.0:
        keep[:] = True
    else:
        assert 1 < keep.sum() < 50
    prob = np.where(keep, prob, 0.0) / prob[keep].sum()
    gen = _generator(lm)
    got = gen.generate_tokens([PROMPTS[3]] * n, max_new_tokens=1, temperature=T, top_p=top_p, seed=0,
                              batch_size=n)
    counts = np.bincount([g.token_ids[0] for g in got], minlength=V)
    assert counts[~keep].sum() == 0
    sd = np.sqrt(n * prob * (1 - prob))
    assert np.all(np.abs(counts - n * prob) <= 5 * sd + 1), np.abs(counts - n * prob).max()
    assert (counts > 0).sum() > 3   # a spread-out distribution, not one token


def test_top_p_filter_equals_transformers_warper():
    import jax.numpy as jnp
    from transformers.generation.logits_process import TopPLogitsWarper

    from embedjax.generate import top_p_filter

    logits = np.random.default_rng(0).normal(0, 2, size=(6, 50)).astype(np.float32)
    for p in (0.05, 0.3, 0.9, 0.999):
        want = TopPLogitsWarper(p)(None, torch.tensor(logits)).numpy()
        got = np.asarray(top_p_filter(jnp.asarray(logits), jnp.float32(p)))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
        assert 0 < np.isinf(got).sum() if p < 0.99 else True
        np.testing.assert_array_equal(got[~np.isinf(got)], logits[~np.isinf(want)])


@pytest.mark.slow   # ~20-40 s on 2 cores: eight programs compiled for 1 and 8 devices
def test_generation_on_8_devices_equals_one_device(lm):
    import jax

    from embedjax.sharding import make_mesh

    assert jax.device_count() == 8
    mesh = make_mesh({"data": 4, "fsdp": 2})
    one, eight = _generator(lm), _generator(lm, mesh=mesh)
    emb = eight.params["decoder"]["token_embedder"]["embedding"]
    assert emb.sharding.spec[1] == "fsdp"   # parameters are sharded (the embed axis over fsdp)
    prompts = PROMPTS * 3
    for kw in (dict(), dict(temperature=1.0, seed=5)):
        want = [g.token_ids for g in one.generate_tokens(prompts, max_new_tokens=8, batch_size=8, **kw)]
        assert [g.token_ids for g in eight.generate_tokens(prompts, max_new_tokens=8, batch_size=8, **kw)] == want
    conts = [" of the cells", " is", " and not", " was"] * 3
    np.testing.assert_allclose(eight.score_continuations(prompts, conts, batch_size=8).sum,
                               one.score_continuations(prompts, conts, batch_size=8).sum, atol=1e-5)


def test_prompts_of_one_bucket_compile_once(lm, tokenizer):
    gen = _generator(lm)
    short = ["the cell", "x"]
    other = ["patients treated with", "a protein"]
    assert max(len(x) for x in tokenizer(short + other)["input_ids"]) <= 16
    gen.generate(short, max_new_tokens=4, batch_size=2)
    assert gen.num_compilations == 1
    gen.generate(other, max_new_tokens=4, batch_size=2)      # other lengths, same bucket (16)
    gen.generate(short + other, max_new_tokens=4, batch_size=2)   # two batches of the same shape
    assert gen.num_compilations == 1
    assert 16 < len(tokenizer(PROMPTS[1])["input_ids"]) <= 32
    gen.generate([PROMPTS[1]], max_new_tokens=4, batch_size=2)
    assert gen.num_compilations == 2   # bucket 32
    gen.generate(short, max_new_tokens=4, batch_size=2, temperature=0.7, seed=1)
    gen.generate(short, max_new_tokens=4, batch_size=2, temperature=0.9, seed=2)   # values are not compiled in
    assert gen.num_compilations == 3


def test_load_lm_takes_generation_config_eos(lm, tmp_path):
    """transformers' generate stops on generation_config.json's eos_token_id (which may list more ids than
    config.json's); load_lm does too."""
    import json
    import shutil

    from embedjax.models.convert import load_lm

    _, _, folder, cfg, _, _ = lm
    assert cfg.eos_token_id == 1
    shutil.copytree(folder, tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7]}))
    cfg2, _, _ = load_lm(tmp_path / "m")
    assert cfg2.eos_token_id == (1, 7)
    assert _generator(lm, config=cfg2).eos_token_ids == (1, 7)


def test_refusals(lm, tmp_path):
    from embedjax.errors import ModelLoadError
    from embedjax.generate import Generator
    from embedjax.models.convert import load_lm

    _, _, folder, cfg, params, tok = lm
    with pytest.raises(ValueError, match="needs a causal language model"):
        Generator(dataclasses.replace(cfg, attention="bidirectional"), params, tok)
    gen = _generator(lm, max_prompt_length=16)
    with pytest.raises(ValueError, match="prompt 1 has .* tokens, more than max_prompt_length=16"):
        gen.generate(["x", PROMPTS[1] * 3])
    with pytest.raises(ValueError, match="temperature"):
        gen.generate(["x"], temperature=-1.0)
    import json
    import shutil

    untied = tmp_path / "untied"
    shutil.copytree(folder, untied)
    c = json.loads((untied / "config.json").read_text())
    if c.get("tie_word_embeddings", False) is False:   # qwen3 here: drop its lm_head.weight
        from safetensors.numpy import load_file, save_file
        t = load_file(str(untied / "model.safetensors"))
        del t["lm_head.weight"]
        save_file(t, str(untied / "model.safetensors"), metadata={"format": "pt"})
    else:                                               # gemma3: untie a tied checkpoint (no lm_head.weight)
        (untied / "config.json").write_text(json.dumps(dict(c, tie_word_embeddings=False)))
    with pytest.raises(ModelLoadError, match="no lm_head.weight"):
        load_lm(untied)
