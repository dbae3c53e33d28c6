"""Helpers shared by the efficient attention kernels.

Every kernel receives q `[..., q_len, heads, head_dim]` and k/v
`[..., kv_len, kv_heads, head_dim]` with any number of leading batch dims. The
kernels here flatten those dims into one batch axis `B`, give k/v as many heads
as q (grouped-query attention repeats kv head h // groups, as in
`functional.attention_weights`), and restore the caller's shape at the end.
Masks keep a leading size-1 batch when they broadcast, so no kernel copies a
mask or bias once per batch element.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from transformer_jax import validation
from transformer_jax.attention import functional

NEG = jnp.finfo(jnp.float32).min  # finite "minus infinity": exp() of it is 0, never NaN


def batch_shape(q, k) -> tuple[int, ...]:
    """The broadcast leading (batch) dims `...` of q `[..., q_len, H, d]` and
    k `[..., kv_len, Hkv, d]`."""
    return tuple(functional.scores_shape(q, k)[:-3])


def flatten_qkv(q, k, v):
    """Returns q `[B, q_len, H, d]`, k/v `[B, kv_len, H, d]` and the caller's batch shape."""
    functional.check_qkv(q, k, v)
    batch = batch_shape(q, k)
    size = math.prod(batch)

    def flat(x):
        return jnp.broadcast_to(x, (*batch, *x.shape[-3:])).reshape(size, *x.shape[-3:])

    q, k, v = flat(q), flat(k), flat(v)
    groups = q.shape[-2] // k.shape[-2]
    if groups > 1:
        k, v = jnp.repeat(k, groups, axis=-2), jnp.repeat(v, groups, axis=-2)
    return q, k, v, batch


def unflatten(out, batch):
    """`[B, len, H, d]` -> `[*batch, len, H, d]`."""
    return out.reshape(*batch, *out.shape[1:])


def flatten_lead(x, batch, trailing: int):
    """Flattens the leading dims of x (broadcastable to `batch`) into one axis that
    is 1 when x does not vary over the batch, else prod(batch). `trailing` dims are kept:
    `[*batch, t_1..t_k]` -> `[B|1, t_1..t_k]` with k = trailing."""
    lead = len(batch)
    x = x.reshape((1,) * (lead + trailing - x.ndim) + x.shape)
    if all(s == 1 for s in x.shape[:lead]):
        return x.reshape(1, *x.shape[lead:])
    x = jnp.broadcast_to(x, (*batch, *x.shape[lead:]))
    return x.reshape(math.prod(batch), *x.shape[lead:])


def key_valid(mask, batch, name: str):
    """Key-only mask broadcastable to `[*batch, heads, 1, kv]` -> `[B|1, H|1, kv]` bool.

    Sub-quadratic kernels never see a query-dependent mask: the models express
    causality with the `causal` flag and padding as `[..., 1, 1, kv_len]`. Its shape
    against q, k is checked at the kernel's entry (`functional.check_mask_and_bias`)."""
    if mask is None:
        return None
    functional.check_key_only(name, mask)
    return flatten_lead(mask, batch, trailing=3)[:, :, 0, :].astype(bool)


def check_self_attention(name: str, q_len: int, kv_len: int) -> None:
    """ValueError unless q_len == kv_len: position-based patterns need self-attention."""
    if q_len != kv_len:
        raise ValueError(
            f"attention.kind={name!r} defines its sparsity pattern by token position and needs "
            f"self-attention with q_len == kv_len; got q_len={q_len}, kv_len={kv_len}. "
            "Use kind='xla' or 'chunked' for cross-attention")


def masked_softmax(scores, valid):
    """float32 softmax over the last axis of scores `[..., k]` where valid (bool,
    broadcastable to it); invalid entries get probability 0 and a row with no valid
    entry gets all zeros (as `functional.attention_weights`)."""
    return masked_softmax_parts((scores,), (valid,))[0]


@jax.custom_vjp
def masked_softmax_parts(scores: tuple, valids: tuple) -> tuple:
    """One softmax over the concatenated last axes of several score blocks (e.g. a
    window part `[..., k1]` and a global part `[..., k2]`), without building the
    concatenation; returns probabilities shaped like each block.

    A custom VJP keeps only the probabilities for the backward pass, like
    `jax.nn.softmax`: d s_i = p_i * (g_i - sum_j <p_j, g_j>)."""
    return _softmax_parts_fwd(scores, valids)[0]


def _softmax_parts_fwd(scores, valids):
    masked = [jnp.where(v, s, NEG) for s, v in zip(scores, valids)]
    peak = masked[0].max(axis=-1, keepdims=True)
    for m in masked[1:]:
        peak = jnp.maximum(peak, m.max(axis=-1, keepdims=True))
    exps = [jnp.where(v, jnp.exp(m - peak), 0.0) for m, v in zip(masked, valids)]
    total = sum(e.sum(axis=-1, keepdims=True) for e in exps)
    probs = tuple(safe_divide(e, total) for e in exps)
    return probs, probs


def _softmax_parts_bwd(probs, grads):
    inner = sum(jnp.sum(p * g, axis=-1, keepdims=True) for p, g in zip(probs, grads))
    return tuple(p * (g - inner) for p, g in zip(probs, grads)), None


masked_softmax_parts.defvjp(_softmax_parts_fwd, _softmax_parts_bwd)


def dropout(probs, rate: float, rng, deterministic: bool):
    """`functional.apply_dropout` on probabilities of any shape."""
    return functional.apply_dropout(probs, rate, rng, deterministic)


def safe_divide(num, den):
    """num / den (broadcasting), 0 where den is 0 (a row with no valid key), with
    finite gradients there. A NaN (or inf) anywhere still comes out as NaN, as the
    dense kernel's would: a diverging run must not read as zeros."""
    empty = den == 0
    return jnp.where(empty, 0.0, num / jnp.where(empty, 1.0, den))


def check_arg(name: str, arg: str, value: int, minimum: int = 1) -> None:
    """ValueError naming the keyword `arg` of a kernel called directly (not through an
    AttentionConfig, whose fields `check_positive` names) unless it is an int >= minimum:
    a window of -1 gave zeros, a block size of 0 a ZeroDivisionError."""
    validation.int_at_least(arg, value, minimum, where=f" for kind={name!r}")


def check_positive(name: str, field: str, value: int, minimum: int = 1) -> None:
    """ValueError naming `attention.<field>` and the kind unless it is an int >= minimum."""
    validation.int_at_least(f"attention.{field}", value, minimum, where=f" for kind={name!r}")


def reject(name: str, *, position: str | None = None, causal: bool | None = None,
           attention_dropout: float | None = None, why: str = "") -> None:
    """Raises the ValueError for a model setting a kernel cannot honour."""
    if position == "alibi":
        raise ValueError(
            f"position='alibi' cannot be used with attention.kind={name!r}: ALiBi is a dense "
            f"[heads, n, n] additive bias and {why or 'this kernel takes no bias'}; use "
            "position='rope', 'learned' or 'sinusoidal', or kind='xla'/'chunked'")
    if causal:
        raise ValueError(
            f"attention.kind={name!r} cannot be causal: {why}; use it in a bidirectional "
            "encoder, or pick 'chunked', 'local', 'longformer', 'bigbird', 'linear' or 'performer'")
    if attention_dropout:
        raise ValueError(
            f"attention_dropout={attention_dropout} is not supported by attention.kind={name!r}: "
            f"{why}; set attention_dropout=0.0")
