"""`bigbird`: block-sparse attention of Zaheer et al. 2020 (arXiv 2007.14062),
BigBird-ITC: window blocks, global blocks drawn from the sequence itself, and
random blocks. Defaults follow their App. E (block 64, 3 window blocks,
2 global blocks, 3 random blocks).

With blocks of b tokens (nb blocks, padded), query block i attends to
  * window blocks i-1, i, i+1 (`num_window_blocks`, odd; only i-1, i when causal),
  * the global blocks: the first ceil(g/2) and last floor(g/2) blocks (the ITC
    choice of their code: first and last block for g = 2),
  * `num_random_blocks` random blocks per head, drawn once from `random_seed`
    among the blocks not already seen (and, when causal, earlier blocks);
and the rows of global blocks attend to everything. Causal mode keeps the
pattern and adds j <= i.

Every query block gathers its (w + g + r) key blocks into
`[B, H, nb, (w+g+r) b, d]` and scores `[B, H, nb, b, (w+g+r) b]` (the
"blockify, gather, compute" of their App. D); global rows score all keys
`[B, H, g b, n]` and overwrite their rows. O(n b (w+g+r)) memory, never `[n, n]`.
(Scoring the shared global key blocks in place instead of gathering them was
tried: XLA's CPU peak memory came out higher, not lower.)
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.attention import functional
from transformer_jax.attention.registry import AttentionVariant, register
from transformer_jax.attention.variants import blocks, common

NAME = "bigbird"


def global_blocks(nb: int, num_global: int) -> tuple[int, ...]:
    """Indices of the global blocks among nb: the first ceil(g/2) and last floor(g/2)."""
    first = (num_global + 1) // 2
    return tuple(sorted(set(range(min(first, nb))) | set(range(max(nb - (num_global - first), 0), nb))))


def window_offsets(num_window: int, causal: bool) -> tuple[int, ...]:
    """Block offsets of the window, e.g. (-1, 0, 1) for 3 blocks, (-1, 0) when causal."""
    half = num_window // 2
    return tuple(range(-half, 1 if causal else half + 1))


def random_blocks(nb: int, num_heads: int, *, num_window: int, num_global: int,
                  num_random: int, seed: int, causal: bool) -> np.ndarray:
    """`[heads, nb, num_random]` random key block of every query block, -1 = none.

    Drawn with numpy from `seed` at trace time, so the pattern is a constant of the
    compiled program: the same config gives the same blocks on every call and host.
    Candidates exclude the window and global blocks (already attended) and, when
    causal, any block that is not strictly before the window."""
    half = num_window // 2
    i, j = np.arange(nb)[:, None], np.arange(nb)[None, :]
    allowed = (np.abs(i - j) > half) & ~np.isin(j, global_blocks(nb, num_global))
    if causal:
        allowed &= j < i
    order = np.random.default_rng(seed).random((num_heads, nb, nb))
    order = np.where(allowed, order, np.inf).argsort(axis=-1, kind="stable")[..., :num_random]
    picked = np.take_along_axis(np.broadcast_to(allowed, order.shape[:2] + (nb,)), order, axis=-1)
    out = np.where(picked, order, -1)
    return np.pad(out, ((0, 0), (0, 0), (0, num_random - out.shape[-1])), constant_values=-1)


def block_layout(n: int, block: int, num_heads: int, *, num_window: int, num_global: int,
                 num_random: int, seed: int, causal: bool):
    """Gather indices `[H|1, nb, R]` (numpy) and per-block validity `[H|1, nb, R]` of the
    R = window + global + random key blocks of every query block, and the global blocks.
    A window block that is also global is marked invalid in the window part, so no
    key is counted twice."""
    nb = blocks.num_blocks(n, block)
    glob = global_blocks(nb, num_global)
    w_idx, w_raw = blocks.offset_blocks(nb, window_offsets(num_window, causal))
    w_ok = (w_raw >= 0) & (w_raw < nb) & ~np.isin(w_raw, glob)
    g_idx = np.broadcast_to(np.asarray(glob, int), (1, nb, len(glob)))
    # Without random blocks every head has the same pattern: one layout row serves all.
    heads = num_heads if num_random else 1
    r_idx = random_blocks(nb, heads, num_window=num_window, num_global=num_global,
                          num_random=num_random, seed=seed, causal=causal)
    parts = [np.broadcast_to(x, (heads, nb, x.shape[-1])) for x in (w_idx, g_idx, r_idx)]
    oks = [np.broadcast_to(x, (heads, nb, x.shape[-1]))
           for x in (w_ok, np.ones(g_idx.shape, bool), r_idx >= 0)]
    return np.maximum(np.concatenate(parts, -1), 0), np.concatenate(oks, -1), glob


def _sparse_valid(qb, idx, ok, valid_k, n, causal):
    """Validity `[B|1, H|1, nb, b|1, R b]` of the gathered keys of every query block."""
    block = qb.shape[3]
    k_pos = blocks.key_positions(idx, block)[:, :, None, :]  # [Hi, nb, 1, R b]
    valid = blocks.block_valid(ok, block)[:, :, None, :] & (k_pos < n)
    if causal:
        valid = valid & (blocks.query_positions(qb.shape[2], block)[..., None] >= k_pos)
    valid = valid[None]
    if valid_k is not None:
        kv_ok = blocks.gather_blocks(blocks.to_blocks(valid_k, block, value=False), idx)
        valid = valid & kv_ok[:, :, :, None, :]
    return valid


def _global_rows(qb, k, v, glob, valid_k, n, causal, scale, drop):
    """Rows of the global blocks attend to every key: `[B, H, g, b, d]`."""
    bsz, heads, _, block, d = qb.shape
    rows = qb[:, :, jnp.asarray(glob)].reshape(bsz, heads, -1, d)  # [B, H, g b, d]
    s = jnp.einsum("bhqd,bhkd->bhqk", rows, k, preferred_element_type=jnp.float32) * scale
    k_pos = jnp.arange(k.shape[2])
    valid = (k_pos < n)[None, None, None, :]
    if valid_k is not None:
        valid = valid & blocks.pad_axis(valid_k, -1, k.shape[2], False)[:, :, None, :]
    if causal:
        q_pos = (jnp.asarray(glob)[:, None] * block + jnp.arange(block)).reshape(-1)
        valid = valid & (q_pos[:, None] >= k_pos[None, :])
    probs = drop(common.masked_softmax(s, valid))
    out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(bsz, heads, len(glob), block, d)


def bigbird_attention(q, k, v, *, mask=None, causal: bool = False, block_size: int = 64,
                      num_window_blocks: int = 3, num_global_blocks: int = 2,
                      num_random_blocks: int = 3, random_seed: int = 0, dropout_rate: float = 0.0,
                      dropout_rng=None, deterministic: bool = True):
    """q `[..., n, heads, d]`, k/v `[..., n, kv_heads, d]`, mask key-only `[..., 1, n]`
    -> `[..., n, heads, d]`."""
    _check_layout(common.check_arg, "", block_size, num_window_blocks, num_global_blocks,
                  num_random_blocks)
    functional.check_mask_and_bias(q, k, mask, kind=NAME, key_only=True)
    batch = common.batch_shape(q, k)
    valid_k = common.key_valid(mask, batch, NAME)
    q, k, v, batch = common.flatten_qkv(q, k, v)
    n, heads = q.shape[1], q.shape[2]
    common.check_self_attention(NAME, n, k.shape[1])
    qb, kb, vb = (blocks.to_blocks(jnp.swapaxes(x, 1, 2), block_size) for x in (q, k, v))
    idx, ok, glob = block_layout(n, block_size, heads, num_window=num_window_blocks,
                                 num_global=num_global_blocks, num_random=num_random_blocks,
                                 seed=random_seed, causal=causal)
    rngs = [None, None] if dropout_rng is None else list(jax.random.split(dropout_rng))
    drop = lambda i, p: common.dropout(p, dropout_rate, rngs[i], deterministic)
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = blocks.scores(qb, blocks.gather_blocks(kb, idx), scale)
    probs = drop(0, common.masked_softmax(s, _sparse_valid(qb, idx, ok, valid_k, n, causal)))
    out = blocks.weighted(probs, blocks.gather_blocks(vb, idx))  # [B, H, nb, b, d]
    if glob:
        kf, vf = (x.reshape(*x.shape[:2], -1, x.shape[-1]) for x in (kb, vb))
        rows = _global_rows(qb, kf, vf, glob, valid_k, n, causal, scale, lambda p: drop(1, p))
        # Block i comes from `rows` if it is global, else from `out`: a static gather
        # (whose gradient is a scatter-add) instead of a scatter-set of the rows.
        source = np.arange(qb.shape[2])
        source[list(glob)] = qb.shape[2] + np.arange(len(glob))
        out = jnp.concatenate([out, rows], axis=2)[:, :, source]
    return common.unflatten(blocks.unblock(out, n).astype(q.dtype), batch)


def _fn(q, k, v, *, mask, bias, causal, config, extra, dropout_rate, dropout_rng, deterministic):
    del bias, extra  # supports_bias=False: MultiHeadAttention never passes one
    return bigbird_attention(
        q, k, v, mask=mask, causal=causal, block_size=config.block_size,
        num_window_blocks=config.num_window_blocks, num_global_blocks=config.num_global_blocks,
        num_random_blocks=config.num_random_blocks, random_seed=config.random_seed,
        dropout_rate=dropout_rate, dropout_rng=dropout_rng, deterministic=deterministic)


def _check_layout(check, prefix: str, block_size, num_window_blocks, num_global_blocks,
                  num_random_blocks) -> None:
    """The block counts, by `check` (config fields, or a direct call's arguments)."""
    check(NAME, "block_size", block_size)
    check(NAME, "num_window_blocks", num_window_blocks)
    if num_window_blocks % 2 == 0:
        raise ValueError(f"{prefix}num_window_blocks={num_window_blocks} must be odd (the query "
                         "block plus the same number of blocks on each side), e.g. 3")
    check(NAME, "num_global_blocks", num_global_blocks, minimum=0)
    check(NAME, "num_random_blocks", num_random_blocks, minimum=0)


def _validate(config, *, causal, position, attention_dropout):
    del causal, attention_dropout
    _check_layout(common.check_positive, "attention.", config.block_size,
                  config.num_window_blocks, config.num_global_blocks, config.num_random_blocks)
    common.reject(NAME, position=position, why="block-sparse attention never builds the n x n bias")


register(AttentionVariant(NAME, _fn, validate=_validate, full_mask=False, supports_bias=False,
                          supports_decode=False, supports_weights=False))
