"""Cached autoregressive generation for `GPT`, with the whole loop inside `jit`.

Prompts are right-padded `[batch, P]` with per-row `prompt_lengths`. The shortest
prompt is prefilled in one call; from there a `lax.while_loop` steps one token at a
time through the key/value cache, copying prompt tokens while a row is still inside
its prompt and sampling after it. Rows of different lengths therefore need no
left-padding or position shifts, and each row stops at EOS or after
`max_new_tokens` of its own.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.models import generation_args as checks, sampling


class GenerateOutput(NamedTuple):
    """What `generate` returns: the token buffer and each row's length."""
    tokens: jnp.ndarray   # [batch, P + max_new_tokens]; pad_id after each row's end
    lengths: jnp.ndarray  # [batch] prompt + generated tokens (EOS included)


def init_cache(model, batch_size: int, cache_len: int):
    """Zero key/value caches sized `[batch, cache_len, kv_heads, head_dim]` per layer."""
    dummy = jnp.zeros((batch_size, cache_len), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy, decode=True))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def _check_inputs(config, prompts, prompt_lengths, max_new_tokens):
    """-> (prompts int32 `[batch, P]`, lengths int32 `[batch]`, max_new_tokens as an int)."""
    prompts = checks.token_ids("prompts", prompts, "prompt_len", config.vocab_size)
    max_new_tokens = checks.count("max_new_tokens", max_new_tokens)
    batch, width = prompts.shape
    lengths = np.full((batch,), width) if prompt_lengths is None else np.asarray(prompt_lengths)
    # Checked in this order so that min() never meets an empty or non-numeric array.
    if lengths.shape != (batch,) or not np.issubdtype(lengths.dtype, np.integer) \
            or lengths.min() < 1 or lengths.max() > width:
        raise ValueError(f"prompt_lengths={lengths.tolist()} must be one integer per row, "
                         f"each in [1, {width}]")
    total = width + max_new_tokens
    if total > config.max_len:
        raise ValueError(f"prompt length {width} + max_new_tokens {max_new_tokens} = {total} "
                         f"exceeds the model's max_len={config.max_len}")
    return prompts, lengths.astype(np.int32), max_new_tokens


def generate(model, params, prompts, *, prompt_lengths=None, max_new_tokens: int = 32, rng=None,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, pad_id: int = 0) -> GenerateOutput:
    """Samples continuations. `temperature=0` is greedy (argmax) decoding.

    model: a `GPT`; params: its "params" collection.
    prompts: int `[batch, P]`, right-padded; prompt_lengths: int `[batch]` (None = all P).
    Each row copies its own prompt, then samples from the logits `[batch, vocab]` of
    its last position (temperature, then top_k and/or top_p filtering) until it
    emits `eos_id` or has `max_new_tokens` new tokens; P + max_new_tokens must not
    exceed `config.max_len`. Returns `GenerateOutput(tokens [batch, P +
    max_new_tokens], lengths [batch])`, `pad_id` after each row's end."""
    vocab = model.config.vocab_size
    prompts, lengths, max_new_tokens = _check_inputs(model.config, prompts, prompt_lengths,
                                                     max_new_tokens)
    eos_id = checks.token_id("eos_id", eos_id, vocab, optional=True)
    pad_id = checks.token_id("pad_id", pad_id, vocab)
    temperature, top_k, top_p = checks.sampling(temperature, top_k, top_p, vocab)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return _generate(model, params, jnp.asarray(prompts), jnp.asarray(lengths),
                     rng, jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p or 1.0),
                     jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(pad_id),
                     max_new_tokens=max_new_tokens, prefill=int(lengths.min()),
                     greedy=temperature == 0, top_k=top_k, use_top_p=top_p is not None)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "prefill", "greedy",
                                             "top_k", "use_top_p"))
def _generate(model, params, prompts, lengths, rng, temperature, top_p, eos_id, pad_id, *,
              max_new_tokens, prefill, greedy, top_k, use_top_p):
    batch, prompt_len = prompts.shape
    total = prompt_len + max_new_tokens
    tokens = jnp.full((batch, total), pad_id, jnp.int32).at[:, :prompt_len].set(prompts)
    cache = init_cache(model, batch, total)
    logits, state = model.apply({"params": params, "cache": cache}, tokens[:, :prefill],
                                decode=True, mutable=["cache"])
    limit = lengths + max_new_tokens

    def cond(carry):
        t, _, _, _, done, _, _ = carry
        return (t < total) & ~jnp.all(done)

    def body(carry):
        t, tokens, cache, last_logits, done, end, rng = carry
        rng, key = jax.random.split(rng)
        sampled = sampling.select(last_logits, key, greedy=greedy, temperature=temperature,
                                  top_k=top_k, top_p=top_p if use_top_p else None)
        in_prompt = t < lengths
        token = jnp.where(in_prompt, tokens[:, t], sampled)
        token = jnp.where(done, pad_id, token)
        tokens = tokens.at[:, t].set(token)
        finished = ~done & ~in_prompt & ((token == eos_id) | (t + 1 >= limit))
        end = jnp.where(finished, t + 1, end)
        logits, new = model.apply({"params": params, "cache": cache}, token[:, None],
                                  decode=True, mutable=["cache"])
        return t + 1, tokens, new["cache"], logits[:, -1], done | finished, end, rng

    carry = (jnp.int32(prefill), tokens, state["cache"], logits[:, -1],
             jnp.zeros((batch,), bool), jnp.full((batch,), total, jnp.int32), rng)
    _, tokens, _, _, _, end, _ = jax.lax.while_loop(cond, body, carry)
    return GenerateOutput(tokens, end)
