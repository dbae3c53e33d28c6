"""Cached generation for `EncoderDecoder`, with the whole loop inside `jit`.

The source is encoded once. The decoder then steps one token at a time through
the "cache" collection: its self-attention keys/values grow by one position per
step, and each cross-attention projects the fixed memory to keys/values once, on
the first step, and reads them from the cache afterwards (`MultiHeadAttention.
_memory_kv`; per step only the query is projected). Sources are
right-padded `[batch, S]` with a `src_mask` (True on real tokens) that every
cross-attention honours, so rows of different lengths need no special handling.

`generate_seq2seq` is greedy decoding or sampling (`models/sampling.py`);
`beam_search_seq2seq` runs `models/beam_search.py` with batch x beam flattened
into the cache's batch axis. Outputs hold the generated tokens only (no BOS),
EOS included, `pad_id` after each row's end.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.attention.multihead import MEMORY_CACHE_KEYS
from transformer_jax.models import beam_search as beam_lib, generation_args as checks, sampling
from transformer_jax.models.encoder_decoder import EncoderDecoder


class Seq2SeqOutput(NamedTuple):
    """What `generate_seq2seq` returns."""
    tokens: jnp.ndarray   # [batch, max_new_tokens]; pad_id after each row's end
    lengths: jnp.ndarray  # [batch] generated tokens, EOS included


class BeamOutput(NamedTuple):
    """What `beam_search_seq2seq` returns: each row's best hypothesis, and all K."""
    tokens: jnp.ndarray   # [batch, max_new_tokens] the best hypothesis
    lengths: jnp.ndarray  # [batch]
    scores: jnp.ndarray   # [batch] log P(Y) / lp(Y) (Wu et al. 2016, eq. 14)
    beams: beam_lib.BeamSearchOutput   # [batch, K, ...], best first


def _check_inputs(config, src_ids, src_mask, max_new_tokens, bos_id, eos_id, pad_id):
    """-> (src_ids int32 `[batch, S]`, src_mask bool `[batch, S]`, max_new_tokens,
    bos_id, eos_id, pad_id), the last four as Python ints (eos_id may be None)."""
    vocab = config.vocab_size
    src_ids = checks.token_ids("src_ids", src_ids, "src_len", vocab)
    src_mask = np.ones(src_ids.shape, bool) if src_mask is None else np.asarray(src_mask)
    if src_mask.shape != src_ids.shape:
        raise ValueError(f"src_mask has shape {src_mask.shape} but src_ids has {src_ids.shape}")
    src_mask = src_mask.astype(bool)
    if not src_mask.any(-1).all():
        raise ValueError(f"src_mask rows {np.flatnonzero(~src_mask.any(-1)).tolist()} have no "
                         "real token; every source needs at least one")
    max_new_tokens = checks.count("max_new_tokens", max_new_tokens)
    if max_new_tokens > config.max_len:   # the decoder reads BOS + max_new_tokens - 1 tokens
        raise ValueError(f"max_new_tokens={max_new_tokens} exceeds the model's "
                         f"max_len={config.max_len}")
    return (src_ids, src_mask, max_new_tokens, checks.token_id("bos_id", bos_id, vocab),
            checks.token_id("eos_id", eos_id, vocab, optional=True),
            checks.token_id("pad_id", pad_id, vocab))


def init_decode_cache(model: EncoderDecoder, batch_size: int, src_len: int, max_new_tokens: int):
    """Zero caches for decoding `max_new_tokens` steps of a `[batch_size, src_len]`
    source: per decoder layer the self-attention keys/values `[batch, max_new_tokens,
    kv_heads, head_dim]` and the cross-attention's slots for the projected memory."""
    shapes = _cache_shapes(model, batch_size, src_len, max_new_tokens)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _cache_shapes(model, batch_size, src_len, max_new_tokens):
    memory = jnp.zeros((batch_size, src_len, model.config.d_model), model.config.compute_dtype)
    tgt = jnp.zeros((batch_size, max_new_tokens), jnp.int32)
    init = lambda: model.init(jax.random.PRNGKey(0), memory, tgt, decode=True,
                              method=EncoderDecoder.decode)
    return jax.eval_shape(init)["cache"]


def _batch_axes(model, src_len, max_new_tokens):
    """Per cache leaf, its batch axis (-1 for the position counters): the axis whose
    size follows the batch size (layers come first under `scan_layers`)."""
    one, two = (_cache_shapes(model, b, src_len, max_new_tokens) for b in (1, 2))

    def axis(a, b):
        differ = [i for i, (m, n) in enumerate(zip(a.shape, b.shape)) if m != n]
        return differ[0] if differ else -1
    return jax.tree.map(axis, one, two)


def _step_fn(model, params, memory, src_mask):
    """(tokens `[n]`, cache) -> (fp32 logits `[n, vocab]`, cache): one decoder step."""
    def step(tokens, cache):
        logits, state = model.apply({"params": params, "cache": cache}, memory, tokens[:, None],
                                    src_mask, decode=True, method=EncoderDecoder.decode,
                                    mutable=["cache"])
        return logits[:, -1].astype(jnp.float32), state["cache"]
    return step


def _encode(model, params, src_ids, src_mask):
    return model.apply({"params": params}, src_ids, src_mask, method=EncoderDecoder.encode)


def generate_seq2seq(model: EncoderDecoder, params, src_ids, src_mask=None, *, max_new_tokens: int,
                     bos_id: int, eos_id: int | None, temperature: float = 0.0,
                     top_k: int | None = None, top_p: float | None = None, rng=None,
                     pad_id: int = 0) -> Seq2SeqOutput:
    """Greedy decoding (`temperature=0`, the default) or sampling from
    softmax(logits / temperature) after top_k and/or top_p filtering.

    src_ids int `[batch, S]`, right-padded; src_mask `[batch, S]` True on real tokens
    (None = all real). Each row starts from `bos_id` and stops at `eos_id` or after
    `max_new_tokens` tokens. Returns `Seq2SeqOutput(tokens [batch, max_new_tokens],
    lengths [batch])`, `pad_id` after each row's end."""
    cfg = model.config
    src_ids, src_mask, max_new_tokens, bos_id, eos_id, pad_id = _check_inputs(
        cfg, src_ids, src_mask, max_new_tokens, bos_id, eos_id, pad_id)
    temperature, top_k, top_p = checks.sampling(temperature, top_k, top_p, cfg.vocab_size)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return _generate(model, params, jnp.asarray(src_ids), jnp.asarray(src_mask), rng,
                     jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p or 1.0),
                     jnp.int32(bos_id), jnp.int32(-1 if eos_id is None else eos_id),
                     jnp.int32(pad_id), max_new_tokens=max_new_tokens, greedy=temperature == 0,
                     top_k=top_k, use_top_p=top_p is not None)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "greedy", "top_k",
                                             "use_top_p"))
def _generate(model, params, src_ids, src_mask, rng, temperature, top_p, bos_id, eos_id, pad_id,
              *, max_new_tokens, greedy, top_k, use_top_p):
    batch, src_len = src_ids.shape
    memory = _encode(model, params, src_ids, src_mask)
    step = _step_fn(model, params, memory, src_mask)
    cache = init_decode_cache(model, batch, src_len, max_new_tokens)

    def cond(carry):
        t, _, _, done, _, _, _ = carry
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        t, prev, tokens, done, end, cache, rng = carry
        logits, cache = step(prev, cache)
        rng, key = jax.random.split(rng)
        token = sampling.select(logits, key, greedy=greedy, temperature=temperature, top_k=top_k,
                                top_p=top_p if use_top_p else None).astype(jnp.int32)
        token = jnp.where(done, pad_id, token)
        finished = ~done & ((token == eos_id) | (t + 1 >= max_new_tokens))
        end = jnp.where(finished, t + 1, end)
        return t + 1, token, tokens.at[:, t].set(token), done | finished, end, cache, rng

    carry = (jnp.int32(0), jnp.full((batch,), bos_id, jnp.int32),
             jnp.full((batch, max_new_tokens), pad_id, jnp.int32), jnp.zeros((batch,), bool),
             jnp.full((batch,), max_new_tokens, jnp.int32), cache, rng)
    _, _, tokens, _, end, _, _ = jax.lax.while_loop(cond, body, carry)
    return Seq2SeqOutput(tokens, end)


def beam_search_seq2seq(model: EncoderDecoder, params, src_ids, src_mask=None, *, beam_size: int,
                        max_new_tokens: int, bos_id: int, eos_id: int,
                        length_penalty: float = 0.6, pad_id: int = 0) -> BeamOutput:
    """Beam search (`models/beam_search.py`) with `beam_size` beams per row, ranked by
    log P(Y) / ((5 + |Y|) / 6)^length_penalty (Wu et al. 2016, arXiv 1609.08144,
    eq. 14; |Y| counts EOS). src_ids / src_mask as in `generate_seq2seq`. Returns
    `BeamOutput(tokens [batch, max_new_tokens], lengths [batch], scores [batch],
    beams)` where `beams` holds all `[batch, beam_size, ...]` finished hypotheses."""
    cfg = model.config
    src_ids, src_mask, max_new_tokens, bos_id, eos_id, pad_id = _check_inputs(
        cfg, src_ids, src_mask, max_new_tokens, bos_id, eos_id, pad_id)
    if eos_id is None:
        raise ValueError("beam search needs an eos_id")
    beam_lib.check_beam_args(beam_size, max_new_tokens, length_penalty)
    beams = _beam_search(model, params, jnp.asarray(src_ids), jnp.asarray(src_mask),
                         beam_size=int(beam_size), max_new_tokens=max_new_tokens, bos_id=bos_id,
                         eos_id=eos_id, alpha=float(length_penalty), pad_id=pad_id)
    return BeamOutput(beams.tokens[:, 0], beams.lengths[:, 0], beams.scores[:, 0], beams)


@functools.partial(jax.jit, static_argnames=("model", "beam_size", "max_new_tokens", "bos_id",
                                             "eos_id", "alpha", "pad_id"))
def _beam_search(model, params, src_ids, src_mask, *, beam_size, max_new_tokens, bos_id, eos_id,
                 alpha, pad_id):
    batch, src_len = src_ids.shape
    # Row b's beams are rows b*K .. b*K + K-1 of everything the decoder sees.
    memory = jnp.repeat(_encode(model, params, src_ids, src_mask), beam_size, axis=0)
    src_mask = jnp.repeat(src_mask, beam_size, axis=0)
    logits_step = _step_fn(model, params, memory, src_mask)

    def step(tokens, cache):
        logits, cache = logits_step(tokens, cache)
        return jax.nn.log_softmax(logits, axis=-1), cache

    axes = _batch_axes(model, src_len, max_new_tokens)

    def gather_cache(cache, indices):
        # Beams of one row share its memory keys/values, so those need no reordering.
        return jax.tree_util.tree_map_with_path(
            lambda path, a, ax: a if ax < 0 or _is_memory_leaf(path)
            else jnp.take(a, indices, axis=ax), cache, axes)

    cache = init_decode_cache(model, batch * beam_size, src_len, max_new_tokens)
    return beam_lib.beam_search(step, cache, batch_size=batch, beam_size=beam_size,
                                max_len=max_new_tokens, bos_id=bos_id, eos_id=eos_id, alpha=alpha,
                                pad_id=pad_id, gather_cache=gather_cache)


# A cross-attention's projected memory keys/values (and their `memory_ready` flag, a
# scalar that is never gathered): identical across one row's beams, which all see
# the same memory, so beam reordering skips them.
def _is_memory_leaf(path) -> bool:
    return any(getattr(p, "key", None) in MEMORY_CACHE_KEYS for p in path)
