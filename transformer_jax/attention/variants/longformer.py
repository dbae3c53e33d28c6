"""`longformer`: sliding window plus global tokens (Beltagy et al. 2020,
arXiv 2004.05150, Sec. 3.1). Global tokens attend to every token and every
token attends to them; the rest see the window of `local`.

Dense equivalent: M[i, j] = (|i-j| <= w or g[i] or g[j]) and valid[j]
(and j <= i when causal). Computed without an n x n array:
  * every query scores its window blocks `[B, H, nb, b, 3b]` and the G global
    keys `[B, H, n, G]`; one softmax runs over both, with global keys removed
    from the window part so that no key is counted twice;
  * the G global queries score all n keys, `[B, H, G, n]`, and overwrite their
    rows. Time and memory O(n (3w + G)).
Global tokens are `config.global_positions` (e.g. (0,) for [CLS]) plus, when
given, a per-token `global_mask [..., n]` passed at call time
(`MultiHeadAttention(...)(x, global_mask=...)`). With a mask the gathered set
has the static size `config.longformer_max_global`; flagged tokens beyond the
first `longformer_max_global` (by position) are treated as ordinary tokens.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.attention import functional
from transformer_jax.attention.registry import AttentionVariant, register
from transformer_jax.attention.variants import blocks, common
from transformer_jax.attention.variants.local import band, neighbour_layout

NAME = "longformer"


def global_tokens(n: int, positions, global_mask, batch, max_global: int):
    """Global token indices `[B|1, G]`, whether each slot holds a global token
    `[B|1, G]`, and the per-token global flag `[B|1, n]`."""
    positions = sorted(set(int(p) for p in positions))
    bad = [p for p in positions if not 0 <= p < n]
    if bad:
        raise ValueError(f"attention.global_positions={tuple(positions)} has {bad} outside the "
                         f"sequence of length {n}; valid positions are 0..{n - 1}")
    flags = np.zeros((1, n), bool)
    flags[0, positions] = True
    if global_mask is None:
        return jnp.asarray([positions], jnp.int32), jnp.ones((1, len(positions)), bool), flags
    try:
        fits = jnp.broadcast_shapes(global_mask.shape, (*batch, n)) == (*batch, n)
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"longformer global_mask of shape {tuple(global_mask.shape)} must "
                         f"broadcast to [batch..., seq] = {(*batch, n)}")
    flags = common.flatten_lead(jnp.asarray(global_mask, bool), batch, trailing=1) | flags
    g = min(max_global, n)
    flags = flags & (jnp.cumsum(flags, axis=-1) <= g)  # keep the first g flagged tokens
    idx = jnp.argsort(~flags, axis=-1, stable=True)[:, :g]  # flagged first, in position order
    return idx, jnp.take_along_axis(flags, idx, axis=-1), flags


def _take_rows(x, idx):
    """x `[B, n, H, d]`, idx `[B|1, G]` -> `[B, G, H, d]`."""
    idx = jnp.broadcast_to(idx, (x.shape[0], idx.shape[1]))
    return jnp.take_along_axis(x, idx[:, :, None, None], axis=1)


def _replace_rows(out, rows, idx, slot_ok):
    """out `[B, n, H, d]` with token idx[b, g] taken from rows `[B, G, H, d]` where
    slot_ok. A gather from [out; rows] (gradient: scatter-add) rather than a
    scatter-set, whose gradient XLA would constant-fold into an n-sized mask."""
    bsz, n = out.shape[:2]
    g = idx.shape[1]
    idx = jnp.broadcast_to(idx, (bsz, g))
    target = jnp.where(jnp.broadcast_to(slot_ok, (bsz, g)), idx, n)  # n: a dropped write
    source = jnp.broadcast_to(jnp.arange(n), (bsz, n))
    source = source.at[jnp.arange(bsz)[:, None], target].set(n + jnp.arange(g), mode="drop")
    combined = jnp.concatenate([out, rows.astype(out.dtype)], axis=1)
    return jnp.take_along_axis(combined, source[:, :, None, None], axis=1)


def _global_rows(q, k, v, idx, valid_k, causal, scale, drop):
    """Outputs `[B, G, H, d]` of the global queries, which attend to every key."""
    qg = _take_rows(q, idx)
    s = jnp.einsum("bghd,bkhd->bhgk", qg, k, preferred_element_type=jnp.float32) * scale
    valid = jnp.ones((1, 1, 1, k.shape[1]), bool)
    if valid_k is not None:
        valid = valid & valid_k[:, :, None, :]
    if causal:
        valid = valid & (idx[:, None, :, None] >= jnp.arange(k.shape[1]))
    probs = drop(common.masked_softmax(s, valid))
    return jnp.einsum("bhgk,bkhd->bghd", probs.astype(v.dtype), v,
                      preferred_element_type=jnp.float32)


def _window_valid(n, block, window, causal, flags, valid_k):
    """Gather indices and validity `[B|1, H|1, nb, b, r*b]` of the window keys;
    global keys are left out here because the global part scores them."""
    gidx, _, k_pos, q_pos, inside = neighbour_layout(n, block, causal)
    ok = (inside & band(q_pos, k_pos, window, causal))[None]
    is_global = blocks.gather_blocks(blocks.to_blocks(flags[:, None], block, value=False), gidx)
    ok = ok & ~is_global[:, :, :, None, :]
    if valid_k is not None:
        kv_ok = blocks.gather_blocks(blocks.to_blocks(valid_k, block, value=False), gidx)
        ok = ok & kv_ok[:, :, :, None, :]
    return gidx, ok


def _global_key_valid(n_rows, idx, slot_ok, valid_k, causal):
    """Validity `[B|1, H|1, n_rows, G]` of the global keys for every query row."""
    ok = slot_ok[:, None, None, :]
    if valid_k is not None:
        idx_h = jnp.broadcast_to(idx[:, None], (idx.shape[0], valid_k.shape[1], idx.shape[1]))
        ok = ok & jnp.take_along_axis(valid_k, idx_h, axis=-1)[:, :, None, :]
    if causal:
        ok = ok & (jnp.arange(n_rows)[:, None] >= idx[:, None, None, :])
    return ok


def _window_and_global_keys(q, k, v, idx, slot_ok, flags, valid_k, causal, window, scale, drop):
    """Every query over its window plus the global keys, one joint softmax -> `[B, n, H, d]`.
    `drop(i, probs)` applies attention dropout to part i."""
    n, block = q.shape[1], max(window, 1)
    qb, kb, vb = (blocks.to_blocks(jnp.swapaxes(x, 1, 2), block) for x in (q, k, v))
    bsz, heads, nb, _, d = qb.shape
    rows = nb * block
    gidx, local_ok = _window_valid(n, block, window, causal, flags, valid_k)
    s_local = blocks.scores(qb, blocks.gather_blocks(kb, gidx), scale).reshape(bsz, heads, rows, -1)
    r = s_local.shape[-1]
    local_ok = jnp.broadcast_to(local_ok, (*local_ok.shape[:2], nb, block, r)).reshape(
        *local_ok.shape[:2], rows, r)
    scores, valids = [s_local], [local_ok]
    if idx.shape[1]:  # the G global keys, seen by every query
        kg, vg = _take_rows(k, idx), _take_rows(v, idx)  # [B, G, H, d]
        scores.append(jnp.einsum("bhqd,bghd->bhqg", qb.reshape(bsz, heads, rows, d), kg,
                                 preferred_element_type=jnp.float32) * scale)
        valids.append(_global_key_valid(rows, idx, slot_ok, valid_k, causal))
    probs = [drop(i, p) for i, p in enumerate(common.masked_softmax_parts(tuple(scores), tuple(valids)))]
    out = blocks.weighted(probs[0].reshape(bsz, heads, nb, block, r), blocks.gather_blocks(vb, gidx))
    out = out.reshape(bsz, heads, rows, d)
    if idx.shape[1]:
        out = out + jnp.einsum("bhqg,bghd->bhqd", probs[1].astype(v.dtype), vg,
                               preferred_element_type=jnp.float32)
    return jnp.swapaxes(out[:, :, :n], 1, 2)


def longformer_attention(q, k, v, *, mask=None, causal: bool = False, window: int = 128,
                         global_positions=(0,), global_mask=None, max_global: int = 16,
                         dropout_rate: float = 0.0, dropout_rng=None, deterministic: bool = True):
    """q `[..., n, heads, d]`, k/v `[..., n, kv_heads, d]`, mask key-only `[..., 1, n]`,
    global_mask bool `[..., n]` (optional) -> `[..., n, heads, d]`."""
    common.check_arg(NAME, "window", window, minimum=0)
    common.check_arg(NAME, "max_global", max_global, minimum=0)
    functional.check_mask_and_bias(q, k, mask, kind=NAME, key_only=True)
    batch = common.batch_shape(q, k)
    valid_k = common.key_valid(mask, batch, NAME)
    q, k, v, batch = common.flatten_qkv(q, k, v)
    n = q.shape[1]
    common.check_self_attention(NAME, n, k.shape[1])
    idx, slot_ok, flags = global_tokens(n, global_positions, global_mask, batch, max_global)
    rngs = [None] * 3 if dropout_rng is None else list(jax.random.split(dropout_rng, 3))
    drop = lambda i, p: common.dropout(p, dropout_rate, rngs[i], deterministic)

    scale = 1.0 / math.sqrt(q.shape[-1])
    out = _window_and_global_keys(q, k, v, idx, slot_ok, jnp.asarray(flags), valid_k, causal,
                                  window, scale, drop)
    if idx.shape[1]:
        rows = _global_rows(q, k, v, idx, valid_k, causal, scale, lambda p: drop(2, p))
        out = _replace_rows(out, rows, idx, slot_ok)
    return common.unflatten(out.astype(q.dtype), batch)


def _fn(q, k, v, *, mask, bias, causal, config, extra, dropout_rate, dropout_rng, deterministic):
    del bias  # supports_bias=False: MultiHeadAttention never passes one
    return longformer_attention(
        q, k, v, mask=mask, causal=causal, window=config.window,
        global_positions=config.global_positions, global_mask=extra.get("global_mask"),
        max_global=config.longformer_max_global, dropout_rate=dropout_rate,
        dropout_rng=dropout_rng, deterministic=deterministic)


def _validate(config, *, causal, position, attention_dropout):
    del causal, attention_dropout
    common.check_positive(NAME, "window", config.window, minimum=0)
    common.check_positive(NAME, "longformer_max_global", config.longformer_max_global, minimum=0)
    if any(not isinstance(p, int) or p < 0 for p in config.global_positions):
        raise ValueError(f"attention.global_positions={config.global_positions!r} must be "
                         "non-negative int token positions, e.g. (0,) for [CLS]")
    common.reject(NAME, position=position,
                  why="the sliding window plus global tokens never builds the n x n bias")


register(AttentionVariant(NAME, _fn, validate=_validate, full_mask=False, supports_bias=False,
                          supports_decode=False, supports_weights=False,
                          call_args=("global_mask",)))
