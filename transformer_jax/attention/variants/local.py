"""`local`: sliding-window attention. Token i attends to j with |i - j| <= w
(bidirectional) or i - w <= j <= i (causal), as the sliding window of Beltagy
et al. 2020 (Longformer, arXiv 2004.05150, Sec. 3.1) and the local attention
of Parmar et al. 2018 (arXiv 1802.05751).

Computed block by block: with blocks of b = w tokens every key within distance
w of a query in block i lies in blocks i-1, i, i+1 (i-1, i when causal), so the
kernel gathers those into `[B, H, nb, 3b, d]` and builds scores
`[B, H, nb, b, 3b]`: O(n w) time and memory, never `[n, n]`.
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from transformer_jax.attention import functional
from transformer_jax.attention.registry import AttentionVariant, register
from transformer_jax.attention.variants import blocks, common

NAME = "local"


def window_offsets(causal: bool) -> tuple[int, ...]:
    """Neighbour blocks a query block needs: (-1, 0, 1), or (-1, 0) when causal."""
    return (-1, 0) if causal else (-1, 0, 1)


def band(q_pos, k_pos, window: int, causal: bool):
    """Whether query position q_pos may see key position k_pos under the window
    (broadcasting int arrays: `[1, nb, b, 1]` and `[1, nb, 1, r*b]` -> bool `[1, nb, b, r*b]`)."""
    diff = q_pos - k_pos
    return (diff >= 0) & (diff <= window) if causal else jnp.abs(diff) <= window


def neighbour_layout(n: int, block: int, causal: bool):
    """Gather indices `[1, nb, r]` (numpy), key positions `[1, nb, 1, r*b]`, query
    positions `[1, nb, b, 1]` and whether each gathered key is a real token."""
    nb = blocks.num_blocks(n, block)
    idx, raw = blocks.offset_blocks(nb, window_offsets(causal))
    k_pos = blocks.key_positions(raw, block)[:, :, None, :]     # [1, nb, 1, r*b]
    q_pos = blocks.query_positions(nb, block)[None, :, :, None]  # [1, nb, b, 1]
    inside = (k_pos >= 0) & (k_pos < n)
    return idx, raw, k_pos, q_pos, inside


def local_attention(q, k, v, *, mask=None, causal: bool = False, window: int = 128,
                    dropout_rate: float = 0.0, dropout_rng=None, deterministic: bool = True):
    """q `[..., n, heads, d]`, k/v `[..., n, kv_heads, d]`, mask key-only
    `[..., 1, n]` -> `[..., n, heads, d]`."""
    common.check_arg(NAME, "window", window, minimum=0)
    functional.check_mask_and_bias(q, k, mask, kind=NAME, key_only=True)
    batch = common.batch_shape(q, k)
    valid_k = common.key_valid(mask, batch, NAME)              # [B|1, H|1, n]
    q, k, v, batch = common.flatten_qkv(q, k, v)
    n = q.shape[1]
    common.check_self_attention(NAME, n, k.shape[1])
    block = max(window, 1)
    qb, kb, vb = (blocks.to_blocks(jnp.swapaxes(x, 1, 2), block) for x in (q, k, v))
    idx, _, k_pos, q_pos, inside = neighbour_layout(n, block, causal)
    pattern = inside & band(q_pos, k_pos, window, causal)     # [1, nb, b, r*b]
    valid = pattern[None]                          # [1, 1, nb, b, r*b]
    if valid_k is not None:
        kv_blocks = blocks.gather_blocks(blocks.to_blocks(valid_k, block, value=False), idx)
        valid = valid & kv_blocks[:, :, :, None, :]
    s = blocks.scores(qb, blocks.gather_blocks(kb, idx), 1.0 / math.sqrt(q.shape[-1]))
    probs = common.masked_softmax(s, valid)
    probs = common.dropout(probs, dropout_rate, dropout_rng, deterministic)
    out = blocks.weighted(probs, blocks.gather_blocks(vb, idx))
    return common.unflatten(blocks.unblock(out, n).astype(q.dtype), batch)


def _fn(q, k, v, *, mask, bias, causal, config, extra, dropout_rate, dropout_rng, deterministic):
    del bias, extra  # supports_bias=False: MultiHeadAttention never passes one
    return local_attention(q, k, v, mask=mask, causal=causal, window=config.window,
                           dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                           deterministic=deterministic)


def _validate(config, *, causal, position, attention_dropout):
    del causal, attention_dropout
    common.check_positive(NAME, "window", config.window, minimum=0)
    common.reject(NAME, position=position, why="a sliding window never builds the n x n bias")


register(AttentionVariant(NAME, _fn, validate=_validate, full_mask=False, supports_bias=False,
                          supports_decode=False, supports_weights=False))
