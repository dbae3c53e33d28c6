"""`linformer`: keys and values projected along the sequence to k rows by
learned matrices E, F `[k, max_len]` (Wang et al. 2020, arXiv 2006.04768, eq. 7):

    head = softmax(Q (E K)^T / sqrt(d)) (F V),  scores `[B, H, n, k]`.

The projections are parameters of the owning `MultiHeadAttention` (created in
`make_extra`), shared by all heads (`linformer_share_heads`, their Sec. 4
"headwise sharing") or one pair per head. A shorter sequence uses the first
n columns, which is exactly zero-padding it to max_len; padded keys are zeroed
before the projection, so they contribute nothing. A longer sequence has no
columns to use and is refused. E mixes all positions, so causal masking is
impossible (rejected by `validate`).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.attention import functional
from transformer_jax.attention.registry import AttentionVariant, register
from transformer_jax.attention.variants import common

NAME = "linformer"


def check_length(kv_len: int, max_len: int) -> None:
    """ValueError unless kv_len <= max_len, the length the E, F projections were built for."""
    if kv_len > max_len:
        raise ValueError(
            f"linformer got a sequence of length {kv_len} but attention.linformer_max_len="
            f"{max_len}: its projections E, F have only {max_len} columns. Build the model with "
            f"linformer_max_len >= {kv_len}, or feed sequences of at most {max_len} tokens")


def linformer_attention(q, k, v, e, f, *, mask=None, dropout_rate: float = 0.0,
                        dropout_rng=None, deterministic: bool = True):
    """q `[..., n, heads, d]`, k/v `[..., s, kv_heads, d]`, key-only mask `[..., 1, s]`,
    e/f `[k, max_len]` (shared) or `[heads, k, max_len]` -> `[..., n, heads, d]`."""
    functional.check_mask_and_bias(q, k, mask, kind=NAME, key_only=True)
    batch = common.batch_shape(q, k)
    valid_k = common.key_valid(mask, batch, NAME)
    q, k, v, batch = common.flatten_qkv(q, k, v)
    s = k.shape[1]
    check_length(s, e.shape[-1])
    if valid_k is not None:
        keep = jnp.swapaxes(valid_k, 1, 2)[..., None].astype(k.dtype)  # [B|1, s, H|1, 1]
        k, v = k * keep, v * keep
    e, f = e[..., :s].astype(k.dtype), f[..., :s].astype(v.dtype)
    eq = "rs,bshd->brhd" if e.ndim == 2 else "hrs,bshd->brhd"
    kp, vp = jnp.einsum(eq, e, k), jnp.einsum(eq, f, v)  # [B, k, H, d]
    scores = jnp.einsum("bqhd,brhd->bhqr", q, kp, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores / math.sqrt(q.shape[-1]), axis=-1)  # every projected row is valid
    probs = common.dropout(probs, dropout_rate, dropout_rng, deterministic)
    out = jnp.einsum("bhqr,brhd->bqhd", probs.astype(vp.dtype), vp, preferred_element_type=jnp.float32)
    return common.unflatten(out.astype(q.dtype), batch)


def _make_extra(module, config, *, q_len, kv_len, num_heads, num_kv_heads, head_dim):
    del q_len, num_kv_heads, head_dim
    check_length(kv_len, config.linformer_max_len)
    shape = (config.linformer_k, config.linformer_max_len)
    if not config.linformer_share_heads:
        shape = (num_heads, *shape)
    # Variance 1/max_len keeps a projected key at the scale of one token key (the
    # Xavier-style init of the authors' fairseq code); N(0, 1/k) of their Thm. 1
    # would scale keys by sqrt(n / k) and saturate the softmax at initialisation.
    init = nn.initializers.normal(stddev=1.0 / math.sqrt(config.linformer_max_len))
    return {"linformer_e": module.param("linformer_e", init, shape, module.param_dtype),
            "linformer_f": module.param("linformer_f", init, shape, module.param_dtype)}


def _fn(q, k, v, *, mask, bias, causal, config, extra, dropout_rate, dropout_rng, deterministic):
    del bias, config
    if causal:
        common.reject(NAME, causal=True, why="E, F mix every position into each projected key")
    return linformer_attention(q, k, v, extra["linformer_e"], extra["linformer_f"], mask=mask,
                               dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                               deterministic=deterministic)


def _validate(config, *, causal, position, attention_dropout):
    del attention_dropout
    common.check_positive(NAME, "linformer_k", config.linformer_k)
    common.check_positive(NAME, "linformer_max_len", config.linformer_max_len)
    common.reject(NAME, position=position, causal=causal,
                  why="its projections E, F mix every position (future ones included) into "
                      "each projected key, so neither a causal mask nor a per-pair bias applies")


register(AttentionVariant(NAME, _fn, make_extra=_make_extra, validate=_validate, full_mask=False,
                          supports_bias=False, supports_decode=False, supports_weights=False))
