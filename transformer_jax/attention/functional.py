"""Scaled dot-product attention as pure functions of arrays.

Shapes (einsum letters used below):
  q: `[..., q_len, heads, head_dim]`      (q, h, d)
  k, v: `[..., kv_len, kv_heads, head_dim]` (s, k, d); heads % kv_heads == 0
  mask: bool, broadcastable to `[..., heads, q_len, kv_len]`, True = attend
  bias: float, broadcastable to the same shape, added to the scores
Any number of leading batch dimensions `...` is allowed, including none, so the
functions compose with `jax.vmap`.

Numerics (Vaswani et al. 2017, arXiv 1706.03762, eq. 1): scores are accumulated
and soft-maxed in float32 whatever the input dtype; masked scores are set to the
finite `finfo(float32).min` rather than -inf, and masked probabilities are
zeroed after the softmax, so a row with no valid key gives exactly 0 output
instead of NaN.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from transformer_jax.attention import masks as masks_lib


def check_qkv(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> tuple[int, int]:
    """Validates q `[..., q_len, heads, head_dim]` and k, v `[..., kv_len, kv_heads,
    head_dim]` (same rank, heads % kv_heads == 0); returns (heads, kv_heads)."""
    if q.ndim < 3 or k.ndim != q.ndim or v.ndim != q.ndim:
        raise ValueError(
            "attention expects q, k, v of shape [..., seq, heads, head_dim] with the same rank; "
            f"got q{q.shape}, k{k.shape}, v{v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k{k.shape} and v{v.shape} must have the same shape")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: head_dim of q{q.shape} and k{k.shape} differ")
    heads, kv_heads = q.shape[-2], k.shape[-2]
    if heads % kv_heads:
        raise ValueError(
            f"attention: q has {heads} heads, not a multiple of k/v's {kv_heads} heads")
    return heads, kv_heads


def scores_shape(q: jnp.ndarray, k: jnp.ndarray) -> tuple[int, ...]:
    """The scores' shape `[..., heads, q_len, kv_len]`, batch dims broadcast."""
    batch = jnp.broadcast_shapes(q.shape[:-3], k.shape[:-3])
    return (*batch, q.shape[-2], q.shape[-3], k.shape[-3])


def check_broadcast(name: str, x: jnp.ndarray | None, target: tuple[int, ...]) -> None:
    """Raises a ValueError with both shapes when `x` (a mask or bias) does not
    broadcast to `target`, the scores' shape `[..., heads, q_len, kv_len]`."""
    if x is None:
        return
    try:
        out = jnp.broadcast_shapes(x.shape, target)
    except ValueError:
        out = None
    if out != tuple(target):
        raise ValueError(
            f"attention {name} of shape {tuple(x.shape)} does not broadcast to the scores "
            f"shape [..., heads, q_len, kv_len] = {tuple(target)}")


def check_mask_and_bias(q, k, mask=None, bias=None, *, kind: str | None = None,
                        key_only: bool = False, bias_ok: bool = True) -> None:
    """The one entry check of every kernel's mask and bias (the dense kernel,
    `MultiHeadAttention`, the registry and each variant call it): both must broadcast
    to the scores `[..., heads, q_len, kv_len]` of q, k, so a key mask of the wrong
    length or batch is refused rather than silently padded, cut or broadcast. `kind`
    names the kernel for the capability errors: `key_only` kernels take only key padding
    masks `[..., 1, kv_len]`, and `bias_ok=False` ones no bias at all."""
    target = scores_shape(q, k)
    if mask is not None and jnp.issubdtype(jnp.asarray(mask).dtype, jnp.floating):
        # A float mask would be read as "nonzero = may attend", which inverts an
        # additive 0 / -inf mask without any error.
        raise ValueError(f"attention mask must be boolean (True = may attend), got dtype "
                         f"{jnp.asarray(mask).dtype}; pass an additive float mask as `bias`")
    check_broadcast("mask", mask, target)
    check_broadcast("bias", bias, target)
    if key_only:
        check_key_only(kind, mask)
    if bias is not None and not bias_ok:
        raise ValueError(f"attention.kind={kind!r} does not support an additive bias "
                         "(e.g. ALiBi); use position='learned', 'sinusoidal' or 'rope'")


def check_key_only(kind: str | None, mask) -> None:
    """ValueError unless `mask` is None or a key padding mask `[..., 1, kv_len]`, the only
    masks the sub-quadratic kernels take (models pass causality as the `causal` flag)."""
    if not masks_lib.is_key_only(mask):
        raise ValueError(
            f"attention.kind={kind!r} takes only key padding masks of shape [..., 1, kv_len]; "
            f"got a query-dependent mask of shape {tuple(mask.shape)}")


def build_mask(mask, causal: bool, q_len: int, kv_len: int):
    """Combines a user mask (broadcastable to `[..., heads, q_len, kv_len]`, or None)
    with the causal pattern `[1, q_len, kv_len]` (query i sees keys <= i)."""
    if causal:
        if q_len != kv_len:
            raise ValueError(
                f"causal attention needs q_len == kv_len, got {q_len} and {kv_len}; "
                "pass an explicit mask for cached or offset queries")
        mask = masks_lib.combine_masks(mask, masks_lib.causal_mask(q_len, kv_len))
    return mask


def attention_weights(q, k, *, mask=None, bias=None, causal=False, scale=None):
    """Softmax attention probabilities, float32 `[..., heads, q_len, kv_len]`."""
    heads, kv_heads = check_qkv(q, k, k)
    check_mask_and_bias(q, k, mask, bias)
    mask = build_mask(mask, causal, q.shape[-3], k.shape[-3])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    groups = heads // kv_heads
    # Grouped-query attention (Ainslie et al. 2023, arXiv 2305.13245): query head
    # h uses kv head h // groups; a reshape avoids copying k for every group.
    qg = q.reshape(*q.shape[:-2], kv_heads, groups, q.shape[-1])
    scores = jnp.einsum("...qkgd,...skd->...kgqs", qg, k, preferred_element_type=jnp.float32)
    scores = scores.reshape(*scores.shape[:-4], heads, q.shape[-3], k.shape[-3]) * scale
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if mask is not None:
        probs = jnp.where(mask, probs, 0.0)
    return probs


def apply_dropout(probs, rate: float, rng, deterministic: bool):
    """Inverted dropout on attention probabilities of any shape (e.g. `[..., heads,
    q_len, kv_len]`): kept entries are scaled by 1 / (1 - rate)."""
    if deterministic or rate == 0.0:
        return probs
    if rng is None:
        raise ValueError("attention dropout_rate > 0 with deterministic=False needs a dropout_rng")
    keep = jax.random.bernoulli(rng, 1.0 - rate, probs.shape)
    return jnp.where(keep, probs / (1.0 - rate), 0.0)


def weighted_values(probs, v):
    """probs `[..., heads, q, s]` x v `[..., s, kv_heads, d]` -> `[..., q, heads, d]`."""
    heads, kv_heads = probs.shape[-3], v.shape[-2]
    groups = heads // kv_heads
    pg = probs.reshape(*probs.shape[:-3], kv_heads, groups, *probs.shape[-2:]).astype(v.dtype)
    out = jnp.einsum("...kgqs,...skd->...qkgd", pg, v)
    return out.reshape(*out.shape[:-3], heads, v.shape[-1])


def dot_product_attention(q, k, v, *, mask=None, bias=None, causal=False, scale=None,
                          dropout_rate: float = 0.0, dropout_rng=None,
                          deterministic: bool = True, return_weights: bool = False):
    """Reference softmax attention. Returns `[..., q_len, heads, head_dim]` in q's dtype,
    and the float32 probabilities `[..., heads, q_len, kv_len]` when `return_weights`."""
    check_qkv(q, k, v)
    probs = attention_weights(q, k, mask=mask, bias=bias, causal=causal, scale=scale)
    dropped = apply_dropout(probs, dropout_rate, dropout_rng, deterministic)
    out = weighted_values(dropped, v).astype(q.dtype)
    return (out, probs) if return_weights else out
