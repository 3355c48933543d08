"""Generation and scoring with the decoder LLMs (Qwen3, Gemma 3 text), in JAX, on one device or a mesh: the
language-model side of synthetic training data (Gecko / FRet: an LLM writes a task and a query for a passage,
then rescores retrieved passages).

    cfg, params, tokenizer = convert.load_lm("Qwen/Qwen3-0.6B")
    gen = Generator(cfg, params, tokenizer, mesh=sharding.make_mesh({"data": -1}))
    texts = gen.generate(prompts, max_new_tokens=64, temperature=0.7, top_p=0.9, seed=0, stop=["\\n\\n"])
    scores = gen.score_continuations(prompts, continuations)   # .sum / .mean log-likelihood per pair
    p_yes = gen.yes_probability(relevance_prompts)

What it computes, checked token for token against transformers 5's `model.generate` (tests/models/test_generate.py):

- Prompts are tokenized with the tokenizer's special tokens (Gemma: <bos> in front; Qwen3: none), left-padded to
  a bucket length (`tokenize.bucket_lengths`), in batches of a fixed number of rows: one compiled program per
  (batch rows, prompt bucket, max_new_tokens, decoding mode, stop-table shape), counted in `num_compilations`.
- Positions are transformers' generate positions: cumsum(attention_mask) - 1 (padding at 0), so each prompt
  starts at position 0 whatever its padding, and the i-th new token of a prompt of n tokens is at position n + i.
  (`model(input_ids, attention_mask)` outside generate does not shift them; generate does.)
- Causal masks (and Gemma 3's / Qwen3's sliding windows) are by slot in the padded sequence, as transformers'
  masks are by cache index; with left padding a row's slots are contiguous, so this is the distance in positions.
- Prefill writes the prompt's keys and values into a cache of prompt bucket + max_new_tokens slots
  (`decoder.KVCache`); each step then decodes one token per row inside `jax.lax.while_loop` under `jax.jit`,
  ending early once every row has finished.
- Greedy (temperature 0): the argmax of the logits (the first index among equal maxima, as torch.argmax).
  Sampling: logits / temperature, then top-p as transformers' TopPLogitsWarper (tokens sorted by logit, those
  whose cumulative probability from the least probable up is <= 1 - top_p dropped, the most probable always
  kept), then a categorical draw. transformers' generate also applies top_k=50 by default when sampling; no
  top-k here. Each prompt draws from its own key, `fold_in(fold_in(key(seed), prompt index), step)`, so a
  sampled text depends on the seed and the prompt's index only, not on the batch size, bucket or mesh.
- A row stops at an EOS token (the config's `eos_token_id`; `convert.load_lm` takes generation_config.json's, as
  transformers' generate does) or when its new tokens end with one of the `stop` strings' token sequences
  (each string tokenized on its own, without special tokens), or after max_new_tokens. Then `token_ids` end with
  that EOS / stop sequence (transformers keeps them too) and `text` is the decoding without it (special tokens
  skipped). The text is also cut at the first occurrence of any stop string in it: a stop string the model
  wrote with other tokens than the string's own (which the device-side check cannot see) cuts the text, not
  the token ids, and does not end generation early.

Bidirectional (embedding) configurations are refused: their states are not a language model's.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from embedjax.models.decoder import DecoderConfig, DecoderLM, KVCache
from embedjax.models.layers import unstack_layers
from embedjax.progress import Progress
from embedjax.tokenize import bucket_for, bucket_lengths

log = logging.getLogger(__name__)

MODES = ("greedy", "sample", "top_p")
_FINISH = ("length", "eos", "stop")
_NO_TOKEN = -1          # before a row's first new token, in the stop-sequence window: matches no token
_STOP_FILL = -2         # left of a stop sequence shorter than the table is wide (ignored by the mask)


@dataclasses.dataclass(frozen=True)
class Generation:
    text: str                 # the new tokens decoded, without the EOS / stop sequence that ended them
    token_ids: list[int]      # the new tokens, through the EOS token or stop sequence that ended them
    finish_reason: str        # "eos" | "stop" | "length" (max_new_tokens reached)
    logprobs: list[float]     # log p(token | what precedes it) of each new token under the model (log_softmax of
                              # its logits: no temperature, no top-p)


@dataclasses.dataclass(frozen=True)
class Scores:
    sum: np.ndarray           # [N] log-likelihood of each continuation given its prompt (natural log)
    mean: np.ndarray          # [N] sum / num_tokens
    num_tokens: np.ndarray    # [N] the continuation's tokens


def top_p_filter(logits_BxV: jax.Array, top_p: jax.Array) -> jax.Array:
    """transformers' TopPLogitsWarper (min_tokens_to_keep=1): logits of the tokens outside the nucleus set to
    -inf. Sorted ascending, softmax, cumulative sum; a token whose cumulative probability is <= 1 - top_p is
    dropped; the most probable token is always kept."""
    order_BxV = jnp.argsort(logits_BxV, axis=-1)
    sorted_BxV = jnp.take_along_axis(logits_BxV, order_BxV, axis=-1)
    cum_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1)
    drop_BxV = (cum_BxV <= 1.0 - top_p).at[:, -1].set(False)
    rank_BxV = jnp.argsort(order_BxV, axis=-1)           # inverse permutation: each token's place in the sort
    return jnp.where(jnp.take_along_axis(drop_BxV, rank_BxV, axis=-1), -jnp.inf, logits_BxV)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class Generator:
    """Batched generation and scoring with a `DecoderLM` (see the module docstring).

    `params`: `convert.load_lm`'s tree ({"decoder": ..., "lm_head": ...}; host arrays, `LazyWeight`s or jax
    arrays). `mesh`: an embedjax mesh (`sharding.make_mesh`): parameters are placed by the logical-axis rules
    (fsdp / tensor sharded where the mesh has those axes), batches split over the data axes; the number of rows
    per batch is rounded up to a multiple of the data-parallel size. One process (the results are fetched to
    this host). `max_prompt_length`: the longest prompt accepted (in tokens; a longer one is an error, not cut),
    and the largest bucket. `eos_token_ids`: overrides the config's."""

    def __init__(self, config: DecoderConfig, params: dict, tokenizer: Any, mesh: Any = None, *,
                 max_prompt_length: int = 1024, eos_token_ids: Sequence[int] | int | None = None):
        if config.attention != "causal":
            raise ValueError(f"generation needs a causal language model; this {config.model_type} config has "
                             f"attention={config.attention!r} (an embedding model's bidirectional attention)")
        self.config = dataclasses.replace(config, scan_layers=False, remat="none", dropout_rate=0.0)
        self.model = DecoderLM(self.config)
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.max_prompt_length = int(max_prompt_length)
        self.buckets = bucket_lengths(self.max_prompt_length)
        eos = config.eos_token_id if eos_token_ids is None else eos_token_ids
        eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        self.eos_token_ids = tuple(int(e) for e in eos)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.eos_token_ids or (0,))[0])
        if "decoder" in params and "layers" in params["decoder"]:   # a scanned layout: one entry per layer
            params = dict(params, decoder=unstack_layers(params["decoder"]))
        self.params = self._place(params)
        self.num_compilations = 0   # programs traced (and so compiled) by this generator
        self._decode = jax.jit(self._decode_fn, static_argnames=("max_new_tokens", "mode"))
        self._logprobs = jax.jit(self._logprobs_fn, static_argnames=("last",))

    # ------------------------------------------------------------------------------------------- placement

    def _abstract(self) -> Any:
        ids = jnp.zeros((1, 1), jnp.int32)
        return jax.eval_shape(lambda: self.model.init(jax.random.key(0), ids, ids, ids))["params"]

    def _place(self, params: dict) -> dict:
        """The params on this generator's devices, in the config's `param_dtype`, checked against the model."""
        import flax.linen as nn
        from flax import traverse_util

        boxed = self._abstract()
        want = traverse_util.flatten_dict(nn.meta.unbox(boxed), sep="/")
        have = traverse_util.flatten_dict(params, sep="/")
        if set(want) != set(have):
            missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
            raise ValueError(f"params do not fit a {self.config.model_type} DecoderLM: "
                             + (f"missing {missing[:3]}" if missing else "")
                             + (f" unexpected {extra[:3]}" if extra else "")
                             + (" (tie_word_embeddings is false: an lm_head is needed)" if "lm_head/kernel" in missing
                                else ""))
        dt = jnp.dtype(self.config.param_dtype)
        shards = None
        if self.mesh is not None:
            from embedjax.sharding import param_shardings
            shards = traverse_util.flatten_dict(param_shardings(boxed, self.mesh), sep="/")
        out = {}
        for k, v in have.items():
            if tuple(np.shape(v)) != tuple(want[k].shape):
                raise ValueError(f"param {k!r} has shape {tuple(np.shape(v))}, the model {want[k].shape}")
            if hasattr(v, "read") and shards is not None:   # a LazyWeight: each device reads its own slice
                out[k] = jax.make_array_from_callback(tuple(v.shape), shards[k],
                                                      lambda idx, v=v: np.asarray(v.read(idx)).astype(dt))
            else:
                a = v.astype(dt) if isinstance(v, jax.Array) else np.asarray(v, np.float32).astype(dt)
                out[k] = jax.device_put(a, shards[k]) if shards is not None else jnp.asarray(a)
        return traverse_util.unflatten_dict(out, sep="/")

    def _rows(self, batch_size: int) -> int:
        rows = max(1, int(batch_size))
        if self.mesh is not None:
            from embedjax.sharding import data_parallel_size
            dp = data_parallel_size(self.mesh)
            rows = -(-rows // dp) * dp
        return rows

    def _put(self, *arrays: np.ndarray) -> tuple[Any, ...]:
        if self.mesh is None:
            return tuple(jnp.asarray(a) for a in arrays)
        from embedjax.sharding import batch_sharding
        return tuple(jax.device_put(a, batch_sharding(self.mesh, a.ndim)) for a in arrays)

    def _run(self, fn: Any, *args: Any, **kw: Any) -> Any:
        if self.mesh is None:
            return fn(*args, **kw)
        with jax.set_mesh(self.mesh):
            return fn(*args, **kw)

    # ------------------------------------------------------------------------------------------- programs

    def _decode_fn(self, params: dict, ids_BxP: jax.Array, mask_BxP: jax.Array, rows_B: jax.Array,
                   seed: jax.Array, temperature: jax.Array, top_p: jax.Array, eos_E: jax.Array,
                   stops_SxM: jax.Array, stop_lens_S: jax.Array, *, max_new_tokens: int, mode: str) -> dict:
        """Prefill + decoding of one left-padded batch. Returns the new tokens [B, N] (padding after a row
        ends) and their log-probabilities, how many each row made, why it ended (index into _FINISH) and which
        stop sequence ended it."""
        self.num_compilations += 1   # runs once per trace
        cfg = self.config
        B, P = ids_BxP.shape
        N = max_new_tokens
        S, M = stops_SxM.shape
        log.info("compiling generation: %d rows x (%d prompt + %d new) tokens, %s, %d stop sequences of <= %d "
                 "tokens (program %d of this generator)", B, P, N, mode, S, M, self.num_compilations)
        apply = self.model.apply
        lengths_B = mask_BxP.sum(axis=1)
        positions_BxP = jnp.maximum(jnp.cumsum(mask_BxP, axis=1) - 1, 0)
        kv = KVCache.zeros(cfg, B, P + N)
        kv = dataclasses.replace(kv, mask=kv.mask.at[:, :P].set(mask_BxP))
        logits_Bx1xV, kv = apply({"params": params}, ids_BxP, mask_BxP, positions_BxP, kv=kv, last=1)
        base_key = jax.random.key(seed)
        stop_valid_SxM = jnp.arange(M)[None, :] >= M - stop_lens_S[:, None]

        def pick(logits_BxV: jax.Array, t: Any) -> jax.Array:
            if mode == "greedy":
                return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
            keys_B = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(base_key, r), t))(rows_B)
            scaled_BxV = logits_BxV / temperature
            if mode == "top_p":
                scaled_BxV = top_p_filter(scaled_BxV, top_p)
            return jax.vmap(jax.random.categorical)(keys_B, scaled_BxV).astype(jnp.int32)

        def record(state: dict, logits_BxV: jax.Array, t: Any) -> dict:
            done_B = state["done"]
            tok_B = jnp.where(done_B, self.pad_id, pick(logits_BxV, t))
            logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV, axis=-1), tok_B[:, None], axis=-1)
            out_BxMN = jax.lax.dynamic_update_slice(state["out"], tok_B[:, None], (0, M + t))
            window_BxM = jax.lax.dynamic_slice(out_BxMN, (0, t + 1), (B, M))
            same_BxSxM = (window_BxM[:, None, :] == stops_SxM[None]) | ~stop_valid_SxM[None]
            stop_BxS = same_BxSxM.all(axis=-1) & (stop_lens_S > 0)[None]
            eos_B = (tok_B[:, None] == eos_E[None]).any(axis=-1)
            stopped_B = stop_BxS.any(axis=-1)
            ends_B = ~done_B & (eos_B | stopped_B)
            return dict(
                out=out_BxMN, done=done_B | ends_B,
                logp=jax.lax.dynamic_update_slice(state["logp"], logp_B.astype(jnp.float32), (0, t)),
                count=jnp.where(done_B, state["count"], t + 1),
                reason=jnp.where(ends_B, jnp.where(eos_B, 1, 2), state["reason"]),
                stop=jnp.where(ends_B & ~eos_B, jnp.argmax(stop_BxS, axis=-1), state["stop"]))

        state = dict(out=jnp.full((B, M + N), _NO_TOKEN, jnp.int32), done=lengths_B == 0,
                     logp=jnp.zeros((B, N), jnp.float32),
                     count=jnp.zeros((B,), jnp.int32), reason=jnp.zeros((B,), jnp.int32),
                     stop=jnp.full((B,), -1, jnp.int32))
        state = record(state, logits_Bx1xV[:, 0], 0)

        def cond(carry):
            t, state, _ = carry
            return (t < N) & ~state["done"].all()

        def body(carry):
            t, state, kv = carry
            slot = P + t - 1   # the previous token's slot
            prev_Bx1 = jax.lax.dynamic_slice(state["out"], (0, M + t - 1), (B, 1))
            kv = dataclasses.replace(kv, mask=kv.mask.at[:, slot].set(1), index=jnp.asarray(slot, jnp.int32))
            pos_Bx1 = (lengths_B + t - 1)[:, None]
            logits_Bx1xV, kv = apply({"params": params}, prev_Bx1, jnp.ones_like(prev_Bx1), pos_Bx1, kv=kv)
            return t + 1, record(state, logits_Bx1xV[:, 0], t), kv

        _, state, _ = jax.lax.while_loop(cond, body, (jnp.asarray(1, jnp.int32), state, kv))
        return dict(tokens=state["out"][:, M:], count=state["count"], reason=state["reason"], stop=state["stop"],
                    logp=state["logp"])

    def _logprobs_fn(self, params: dict, ids_BxL: jax.Array, mask_BxL: jax.Array, targets_BxQxK: jax.Array, *,
                     last: int) -> jax.Array:
        """log p(target | the tokens before) at the last `last` positions of a left-padded batch: the first Q
        of those positions, each with K candidate tokens -> [B, Q, K]."""
        self.num_compilations += 1
        log.info("compiling scoring: %d rows x %d tokens, log-probabilities at the last %d (program %d of this "
                 "generator)", *ids_BxL.shape, last, self.num_compilations)
        positions_BxL = jnp.maximum(jnp.cumsum(mask_BxL, axis=1) - 1, 0)
        logits_BxLastxV = self.model.apply({"params": params}, ids_BxL, mask_BxL, positions_BxL, last=last)
        Q = targets_BxQxK.shape[1]
        logp_BxQxV = jax.nn.log_softmax(logits_BxLastxV[:, :Q], axis=-1)
        return jnp.take_along_axis(logp_BxQxV, targets_BxQxK, axis=-1)

    # ------------------------------------------------------------------------------------------- tokens

    def _encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, got one string")
        ids = [list(x) for x in self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]
        for i, x in enumerate(ids):
            if not x:
                raise ValueError(f"prompt {i} is empty (no tokens): a prompt needs at least one token")
            if len(x) > self.max_prompt_length:
                raise ValueError(f"prompt {i} has {len(x)} tokens, more than max_prompt_length="
                                 f"{self.max_prompt_length} (prompts are not cut; shorten it or raise the limit)")
        return ids

    def _encode_piece(self, text: str, what: str) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError(f"{what} {text!r} has no tokens")
        return ids

    def _left_pad(self, seqs: Sequence[Sequence[int]], length: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full((rows, length), self.pad_id, np.int32)
        mask = np.zeros((rows, length), np.int32)
        for i, s in enumerate(seqs):
            ids[i, length - len(s):] = s
            mask[i, length - len(s):] = 1
        return ids, mask

    def _batches(self, lengths: Sequence[int], rows: int, desc: str, unit: str, show: bool | None):
        """Batches of prompt indices, longest first (similar lengths share a bucket), with progress."""
        order = np.argsort(-np.asarray(lengths, np.int64), kind="stable")
        starts = range(0, len(order), rows)
        if show is None:   # a bar (or log lines) only when there is more than one batch
            show = None if len(starts) > 1 else False
        return order, starts, Progress(len(order), desc, unit, show=show)

    # ------------------------------------------------------------------------------------------- generation

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (), batch_size: int = 32,
                 show_progress: bool | None = None) -> list[str]:
        """The texts generated for `prompts` (see `generate_tokens` and the module docstring)."""
        return [g.text for g in self.generate_tokens(prompts, max_new_tokens, temperature, top_p, seed, stop,
                                                     batch_size, show_progress)]

    def generate_tokens(self, prompts: Sequence[str], max_new_tokens: int = 64, temperature: float = 0.0,
                        top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (), batch_size: int = 32,
                        show_progress: bool | None = None) -> list[Generation]:
        """One `Generation` (text, token ids, finish reason) per prompt, in order. temperature 0: greedy;
        else sampling at that temperature with nucleus `top_p` (1: off) from `seed`. `stop`: strings that end
        a text (see the module docstring). `batch_size`: rows per compiled batch (a multiple of the data-parallel
        size on a mesh); fewer prompts than that still run a full batch of padding rows."""
        max_new_tokens = int(max_new_tokens)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if not 0 <= int(seed) < 2 ** 32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        if isinstance(stop, str):
            stop = [stop]
        mode = "greedy" if temperature == 0 else ("top_p" if top_p < 1.0 else "sample")
        stop_ids = [self._encode_piece(s, "stop string") for s in stop]
        S, M = _pow2(max(1, len(stop_ids))), _pow2(max([1] + [len(s) for s in stop_ids]))
        stops = np.full((S, M), _STOP_FILL, np.int32)
        stop_lens = np.zeros((S,), np.int32)
        for i, s in enumerate(stop_ids):
            stops[i, M - len(s):] = s
            stop_lens[i] = len(s)
        eos = np.asarray(self.eos_token_ids or (_NO_TOKEN,), np.int32)

        seqs = self._encode_prompts(prompts)
        rows = self._rows(batch_size)
        order, starts, bar = self._batches([len(s) for s in seqs], rows, "generate", "prompt", show_progress)
        results: list[Generation | None] = [None] * len(seqs)
        pending: list[tuple[np.ndarray, Any]] = []

        def collect(idx: np.ndarray, out: dict) -> None:
            out = jax.device_get(out)
            for j, i in enumerate(idx):
                n, reason = int(out["count"][j]), _FINISH[int(out["reason"][j])]
                ids = [int(x) for x in out["tokens"][j, :n]]
                keep = ids[:-1] if reason == "eos" else ids[:n - len(stop_ids[int(out["stop"][j])])] \
                    if reason == "stop" else ids
                text = self.tokenizer.decode(keep, skip_special_tokens=True)
                cut = min((k for k in (text.find(s) for s in stop) if k >= 0), default=-1)
                if cut >= 0:
                    text, reason = text[:cut], "stop"
                results[i] = Generation(text=text, token_ids=ids, finish_reason=reason,
                                        logprobs=[float(x) for x in out["logp"][j, :n]])
            bar.update(len(idx))

        with bar:
            for s in starts:
                idx = order[s:s + rows]
                length = bucket_for(max(len(seqs[i]) for i in idx), self.buckets)
                ids, mask = self._left_pad([seqs[i] for i in idx], length, rows)
                row_ids = np.zeros((rows,), np.int32)   # each row's prompt index: its sampling key
                row_ids[:len(idx)] = idx
                ids, mask, row_ids = self._put(ids, mask, row_ids)
                out = self._run(self._decode, self.params, ids, mask, row_ids, np.uint32(seed),
                                np.float32(temperature or 1.0), np.float32(top_p), eos, stops, stop_lens,
                                max_new_tokens=max_new_tokens, mode=mode)
                pending.append((idx, out))
                if len(pending) > 1:   # fetch the previous batch while this one runs
                    collect(*pending.pop(0))
            for p in pending:
                collect(*p)
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------------- scoring

    def score_continuations(self, prompts: Sequence[str], continuations: Sequence[str], batch_size: int = 32,
                            show_progress: bool | None = None) -> Scores:
        """log p(continuation | prompt) per pair: the prompt tokenized with special tokens, the continuation
        on its own without them, the two token lists concatenated (so a continuation should carry its own
        leading space); the sum over the continuation's tokens of log_softmax(logits) at each of them, and the
        mean per token. Positions as in generation (each pair from position 0)."""
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts and {len(continuations)} continuations")
        heads = self._encode_prompts(prompts)
        tails = [self._encode_piece(c, f"continuation {i}") for i, c in enumerate(continuations)]
        seqs = [h + t for h, t in zip(heads, tails)]
        limit = self.max_prompt_length + max(len(t) for t in tails) if tails else 0
        buckets = bucket_lengths(max(limit, 1))
        rows = self._rows(batch_size)
        order, starts, bar = self._batches([len(s) for s in seqs], rows, "score", "pair", show_progress)
        total = np.zeros(len(seqs), np.float64)
        with bar:
            for s in starts:
                idx = order[s:s + rows]
                length = bucket_for(max(len(seqs[i]) for i in idx), buckets)
                C = min(_pow2(max(len(tails[i]) for i in idx)), length - 1)
                ids, mask = self._left_pad([seqs[i] for i in idx], length, rows)
                targets = ids[:, -C:, None]
                ids, mask, targets = self._put(ids, mask, targets)
                logp = np.asarray(self._run(self._logprobs, self.params, ids, mask, targets, last=C + 1))
                for j, i in enumerate(idx):
                    total[i] = float(logp[j, C - len(tails[i]):, 0].astype(np.float64).sum())
                bar.update(len(idx))
        n = np.asarray([len(t) for t in tails], np.int64)
        return Scores(sum=total, mean=total / np.maximum(n, 1), num_tokens=n)

    def next_token_logprobs(self, prompts: Sequence[str], token_ids: Sequence[int], batch_size: int = 32,
                            show_progress: bool | None = None) -> np.ndarray:
        """[N, K]: log p(token | prompt) of each of `token_ids` as the token right after each prompt."""
        seqs = self._encode_prompts(prompts)
        cand = np.asarray(list(token_ids), np.int32)
        if cand.ndim != 1 or not cand.size:
            raise ValueError("token_ids must be a non-empty list of token ids")
        rows = self._rows(batch_size)
        order, starts, bar = self._batches([len(s) for s in seqs], rows, "score", "prompt", show_progress)
        out = np.zeros((len(seqs), cand.size), np.float32)
        with bar:
            for s in starts:
                idx = order[s:s + rows]
                length = bucket_for(max(len(seqs[i]) for i in idx), self.buckets)
                ids, mask = self._left_pad([seqs[i] for i in idx], length, rows)
                targets = np.broadcast_to(cand[None, None, :], (rows, 1, cand.size)).copy()
                ids, mask, targets = self._put(ids, mask, targets)
                logp = np.asarray(self._run(self._logprobs, self.params, ids, mask, targets, last=1))
                out[idx] = logp[:len(idx), 0]
                bar.update(len(idx))
        return out

    def answer_token_ids(self, answers: Sequence[str] | str) -> list[int]:
        """The token id of each answer string, tokenized on its own without special tokens; an error unless each
        is exactly one token (a relevance answer must be one next-token choice)."""
        out = []
        for a in ([answers] if isinstance(answers, str) else answers):
            ids = list(self.tokenizer(a, add_special_tokens=False)["input_ids"])
            if len(ids) != 1:
                raise ValueError(f"answer {a!r} is {len(ids)} tokens {ids} for this tokenizer, not one; pass "
                                 "answers that are single tokens (e.g. ' yes' after 'Answer:', 'Yes' after a chat "
                                 "template's assistant turn)")
            out.append(ids[0])
        return list(dict.fromkeys(out))

    def yes_probability(self, prompts: Sequence[str], yes: Sequence[str] | str = (" yes", " Yes"),
                        no: Sequence[str] | str = (" no", " No"), batch_size: int = 32,
                        show_progress: bool | None = None) -> np.ndarray:
        """[N]: P(yes) / (P(yes) + P(no)) for the token right after each prompt, where P(yes) sums the next-token
        probabilities of the `yes` strings' tokens and P(no) those of `no` (each string must be one token, see
        `answer_token_ids`; spelling variants with and without a leading space or a capital are separate tokens
        in BPE vocabularies, so list those the prompt may lead to). A relevance prompt should end where the
        answer starts ("... Is the passage relevant to the query? Answer:" then " yes" / " no")."""
        yes_ids, no_ids = self.answer_token_ids(yes), self.answer_token_ids(no)
        both = sorted(set(yes_ids) & set(no_ids))
        if both:
            raise ValueError(f"token ids {both} are among both the yes and the no answers")
        logp = self.next_token_logprobs(prompts, yes_ids + no_ids, batch_size, show_progress).astype(np.float64)
        lse_yes = np.logaddexp.reduce(logp[:, :len(yes_ids)], axis=1)
        lse_no = np.logaddexp.reduce(logp[:, len(yes_ids):], axis=1)
        return 1.0 / (1.0 + np.exp(lse_no - lse_yes))
