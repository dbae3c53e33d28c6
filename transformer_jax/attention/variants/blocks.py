"""Block reshaping for the sparse kernels (local, longformer, bigbird).

Layout: heads before sequence, `[B, H, n, d]`; a sequence of n tokens padded
to `nb * b` becomes `[B, H, nb, b, d]` (nb blocks of b tokens). A kernel picks,
for every query block, a few key blocks by index and gathers them into
`[B, H, nb, r * b, d]`, so scores are `[B, H, nb, b, r * b]`: O(n * r * b)
memory, never `[n, n]` (the block-sparse scheme of Zaheer et al. 2020,
arXiv 2007.14062, App. D, "blockify, gather, compute").
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def num_blocks(n: int, block: int) -> int:
    """nb = ceil(n / block): blocks needed to cover n tokens."""
    return -(-n // block)


def pad_axis(x, axis: int, length: int, value=0):
    """Pads `axis` of x at the end up to `length` with `value`: `[..., n, ...]` ->
    `[..., length, ...]`."""
    axis = axis % x.ndim
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def to_blocks(x, block: int, axis: int = 2, value=0):
    """Splits `axis` (padded with `value` to a multiple of `block`) into (nb, block):
    `[B, H, n, d]` -> `[B, H, nb, block, d]` for the default axis 2."""
    axis = axis % x.ndim
    nb = num_blocks(x.shape[axis], block)
    x = pad_axis(x, axis, nb * block, value)
    return x.reshape(*x.shape[:axis], nb, block, *x.shape[axis + 1:])


def gather_blocks(xb, idx):
    """Gathers key blocks for every query block.

    xb: `[B, Hx, nb, b, ...]` with Hx = 1 or H; idx: int `[Hi, nb, r]` (Hi = 1 or H),
    entries in [0, nb). Returns `[B, max(Hx, Hi), nb, r * b, ...]`: row i holds
    blocks idx[h, i, 0], ..., idx[h, i, r-1] one after another.
    """
    heads = max(xb.shape[1], idx.shape[0])
    idx = jnp.broadcast_to(jnp.asarray(idx), (heads, *idx.shape[1:]))
    hidx = jnp.arange(heads) if xb.shape[1] > 1 else jnp.zeros(heads, jnp.int32)
    out = xb[:, hidx[:, None, None], idx]  # [B, heads, nb, r, b, ...]
    return out.reshape(*out.shape[:3], out.shape[3] * out.shape[4], *out.shape[5:])


def offset_blocks(nb: int, offsets) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour block indices `[1, nb, len(offsets)]`: clipped into [0, nb) for the
    gather, and raw (block i + offset) so that `key_positions(raw)` falls outside
    [0, n) exactly for the neighbours that do not exist."""
    raw = np.arange(nb)[:, None] + np.asarray(offsets)[None, :]
    return np.clip(raw, 0, nb - 1)[None], raw[None]


def key_positions(idx, block: int):
    """Token position of every gathered key: idx `[Hi, nb, r]` -> `[Hi, nb, r * b]`.
    Built with jnp (an iota inside jit) so no `[n, r*b]` constant lands in the program."""
    pos = jnp.asarray(idx)[..., None] * block + jnp.arange(block)
    return pos.reshape(*pos.shape[:-2], -1)


def block_valid(flags, block: int):
    """Per-block flags `[Hi, nb, r]` -> per-key flags `[Hi, nb, r * b]`."""
    flags = jnp.repeat(jnp.asarray(flags)[..., None], block, axis=-1)
    return flags.reshape(*flags.shape[:-2], -1)


def scores(qb, kg, scale: float):
    """qb `[B, H, nb, b, d]`, kg `[B, H, nb, r*b, d]` -> float32 `[B, H, nb, b, r*b]`."""
    return jnp.einsum("bhnqd,bhnkd->bhnqk", qb, kg, preferred_element_type=jnp.float32) * scale


def weighted(probs, vg):
    """probs `[B, H, nb, b, r*b]`, vg `[B, H, nb, r*b, d]` -> `[B, H, nb, b, d]`."""
    return jnp.einsum("bhnqk,bhnkd->bhnqd", probs.astype(vg.dtype), vg,
                      preferred_element_type=jnp.float32)


def unblock(xb, n: int):
    """`[B, H, nb, b, d]` -> `[B, n, H, d]` (drops the padding, tokens before heads)."""
    x = xb.reshape(xb.shape[0], xb.shape[1], -1, xb.shape[-1])[:, :, :n]
    return jnp.swapaxes(x, 1, 2)


def query_positions(nb: int, block: int):
    """`[nb, b]` token position of every query in block layout."""
    return jnp.arange(nb * block).reshape(nb, block)
