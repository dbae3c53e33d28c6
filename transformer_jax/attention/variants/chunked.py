"""`chunked`: exact softmax attention in O(n) memory (Rabe & Staats 2021,
"Self-attention does not need O(n^2) memory", arXiv 2112.05682).

Queries are processed one chunk at a time (`lax.map`); for each query chunk a
`lax.scan` over key chunks keeps the running row maximum m, the running sum of
exp(s - m) and the running weighted sum of values, rescaling both by
exp(m_old - m_new) when the maximum grows (their Sec. 3, the "online softmax" of
Milakov & Gimelshein 2018, arXiv 1805.02867). Both loop bodies are wrapped in
`jax.checkpoint` so the backward pass stores one carry per key chunk and
recomputes the `[qc, kc]` scores instead of keeping them (their Sec. 4). The
largest array ever built is one `[B, H, query_chunk, key_chunk]` score block.

Full (query-dependent) masks and additive biases are sliced per chunk, so the
kernel also serves cached decoding and ALiBi.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from transformer_jax.attention import functional
from transformer_jax.attention.registry import AttentionVariant, register
from transformer_jax.attention.variants import common
from transformer_jax.attention.variants.blocks import num_blocks, pad_axis

NAME = "chunked"


def _prepare_dense(x, batch, kv_len: int, kv_pad: int, fill):
    """Mask / bias broadcastable to scores -> `[B|1, H|1, Q|1, kv_pad]`, key axis padded."""
    if x is None:
        return None
    x = common.flatten_lead(x, batch, trailing=3)
    x = jnp.broadcast_to(x, (*x.shape[:-1], kv_len))
    return pad_axis(x, -1, kv_pad, fill)


def _slice(x, start, size: int, axis: int):
    """Chunk of x along `axis`, or x itself where that axis broadcasts (size 1)."""
    if x is None or x.shape[axis] == 1:
        return x
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _key_chunks(ki, *, k, v, mask, bias, kc):
    """Key chunk ki of k, v `[B, kc, H, d]` and of the mask / bias (key axis 3)."""
    k_start = ki * kc
    return (jax.lax.dynamic_slice_in_dim(k, k_start, kc, axis=1),
            jax.lax.dynamic_slice_in_dim(v, k_start, kc, axis=1),
            _slice(mask, k_start, kc, axis=3), _slice(bias, k_start, kc, axis=3))


def _key_step(carry, chunks, ki, *, qq, q_start, causal, kc, scale, drop):
    """One online-softmax update of (max m, sum l, acc) with key chunk ki."""
    m, l, acc = carry  # [B, H, qc], [B, H, qc], [B, qc, H, d]
    kk, vv, valid, bias = chunks
    k_start = ki * kc
    s = jnp.einsum("bqhd,bkhd->bhqk", qq, kk, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    if causal:
        q_pos = q_start + jnp.arange(qq.shape[1])[:, None]
        allowed = q_pos >= k_start + jnp.arange(kc)[None, :]
        valid = allowed if valid is None else jnp.logical_and(valid, allowed)
    if valid is not None:
        s = jnp.where(valid, s, common.NEG)
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.exp(s - m_new[..., None])
    if valid is not None:
        p = jnp.where(valid, p, 0.0)
    correction = jnp.exp(m - m_new)
    l = l * correction + p.sum(axis=-1)
    p = drop(p, ki)  # dropout of the normalised probs = dropout of p, since l uses undropped p
    pv = jnp.einsum("bhqk,bkhd->bqhd", p.astype(vv.dtype), vv, preferred_element_type=jnp.float32)
    acc = acc * jnp.swapaxes(correction, 1, 2)[..., None] + pv
    return m_new, l, acc


def _query_chunk(qi, *, q, k, v, mask, bias, causal, qc, kc, nk, scale, drop):
    """Attention output `[B, qc, H, d]` for query chunk qi against every key chunk."""
    q_start = qi * qc
    qq = jax.lax.dynamic_slice_in_dim(q, q_start, qc, axis=1)
    b, _, h, d = qq.shape
    slice_keys = functools.partial(_key_chunks, k=k, v=v, mask=_slice(mask, q_start, qc, axis=2),
                                   bias=_slice(bias, q_start, qc, axis=2), kc=kc)
    update = functools.partial(_key_step, qq=qq, q_start=q_start, causal=causal, kc=kc,
                               scale=scale, drop=functools.partial(drop, qi))

    def step(carry, ki):
        chunks = slice_keys(ki)
        if not causal:
            return update(carry, chunks, ki)
        # Key chunks entirely after the last query of this chunk contribute nothing, so a
        # `cond` skips them (half the work). Its operands are the sliced chunks, never the
        # whole k, v or mask: differentiating a `cond` saves its operands, and the key
        # `scan` would stack a copy per key chunk (O(n²/kc) memory, issue 17).
        return jax.lax.cond(ki * kc <= q_start + qc - 1, update, lambda c, *_: c,
                            carry, chunks, ki)

    step = jax.checkpoint(step, prevent_cse=False)

    def body(carry, ki):
        return step(carry, ki), None

    init = (jnp.full((b, h, qc), common.NEG, jnp.float32), jnp.zeros((b, h, qc), jnp.float32),
            jnp.zeros((b, qc, h, d), jnp.float32))
    (_, l, acc), _ = jax.lax.scan(body, init, jnp.arange(nk))
    return common.safe_divide(acc, jnp.swapaxes(l, 1, 2)[..., None])


def chunked_attention(q, k, v, *, mask=None, bias=None, causal: bool = False,
                      query_chunk: int = 128, key_chunk: int = 128, dropout_rate: float = 0.0,
                      dropout_rng=None, deterministic: bool = True):
    """Exact `functional.dot_product_attention` with O(n) memory; same shapes and masks:
    q `[..., q_len, heads, d]`, k/v `[..., kv_len, kv_heads, d]`, mask / bias
    broadcastable to `[..., heads, q_len, kv_len]` -> `[..., q_len, heads, d]`.
    Queries are processed `query_chunk` at a time against `key_chunk` keys at a time,
    so the largest score block is `[B, heads, query_chunk, key_chunk]`.

    Lengths that are not multiples of the chunks are padded; padded keys are masked."""
    common.check_arg(NAME, "query_chunk", query_chunk)
    common.check_arg(NAME, "key_chunk", key_chunk)
    functional.check_mask_and_bias(q, k, mask, bias, kind=NAME)
    if causal and q.shape[-3] != k.shape[-3]:
        raise ValueError(f"causal attention needs q_len == kv_len, got {q.shape[-3]} and "
                         f"{k.shape[-3]}; pass an explicit mask for cached or offset queries")
    q, k, v, batch = common.flatten_qkv(q, k, v)
    n, s = q.shape[1], k.shape[1]
    qc, kc = min(query_chunk, n), min(key_chunk, s)
    nq, nk = num_blocks(n, qc), num_blocks(s, kc)
    q = pad_axis(q, 1, nq * qc)
    k, v = pad_axis(k, 1, nk * kc), pad_axis(v, 1, nk * kc)
    mask = _prepare_dense(mask, batch, s, nk * kc, False)
    if mask is None and nk * kc != s:
        mask = (jnp.arange(nk * kc) < s)[None, None, None, :]
    bias = _prepare_dense(bias, batch, s, nk * kc, 0)
    if mask is not None and mask.shape[2] > 1:  # query axis padded like q
        mask = pad_axis(mask, 2, nq * qc, False)
    if bias is not None and bias.shape[2] > 1:
        bias = pad_axis(bias, 2, nq * qc, 0)

    def drop(qi, p, ki):
        if deterministic or dropout_rate == 0.0:
            return p
        rng = jax.random.fold_in(jax.random.fold_in(dropout_rng, qi), ki)
        return functional.apply_dropout(p, dropout_rate, rng, False)

    if not deterministic and dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError("attention dropout_rate > 0 with deterministic=False needs a dropout_rng")
    chunk = functools.partial(_query_chunk, q=q, k=k, v=v, mask=mask, bias=bias, causal=causal,
                              qc=qc, kc=kc, nk=nk, scale=1.0 / math.sqrt(q.shape[-1]), drop=drop)
    out = jax.lax.map(jax.checkpoint(chunk, prevent_cse=False), jnp.arange(nq))  # [nq, B, qc, H, d]
    out = jnp.moveaxis(out, 0, 1).reshape(q.shape[0], nq * qc, *q.shape[2:])[:, :n]
    return common.unflatten(out.astype(q.dtype), batch)


def _fn(q, k, v, *, mask, bias, causal, config, extra, dropout_rate, dropout_rng, deterministic):
    del extra
    return chunked_attention(q, k, v, mask=mask, bias=bias, causal=causal,
                             query_chunk=config.query_chunk, key_chunk=config.key_chunk,
                             dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                             deterministic=deterministic)


def _validate(config, *, causal, position, attention_dropout):
    del causal, position, attention_dropout  # exact attention: every mask, bias and dropout
    common.check_positive(NAME, "query_chunk", config.query_chunk)
    common.check_positive(NAME, "key_chunk", config.key_chunk)


register(AttentionVariant(NAME, _fn, validate=_validate, exact=True, cross_attention=True))
