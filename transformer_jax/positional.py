"""Position information as pure functions: sinusoidal tables, RoPE and ALiBi.

Learned absolute positions are parameters and live in `embeddings.py`.
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from transformer_jax.validation import positive_int

POSITION_KINDS = ("learned", "sinusoidal", "rope", "alibi", "none")


def sinusoidal_table(length: int, dim: int, base: float = 10000.0) -> jnp.ndarray:
    """`[length, dim]` table of Vaswani et al. 2017 (arXiv 1706.03762, sec. 3.5):
    PE(p, 2i) = sin(p / base^(2i/dim)), PE(p, 2i+1) = cos(p / base^(2i/dim))."""
    pos = jnp.arange(length, dtype=jnp.float32)[:, None]
    inv = base ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles = pos * inv[None, :]
    table = jnp.zeros((length, dim), jnp.float32)
    table = table.at[:, 0::2].set(jnp.sin(angles))
    return table.at[:, 1::2].set(jnp.cos(angles[:, : dim // 2]))


def rope_angles(positions: jnp.ndarray, head_dim: int, base: float = 10000.0):
    """cos/sin of RoPE angles, each `[..., seq, 1, head_dim]` (broadcast over heads)."""
    if head_dim % 2:
        raise ValueError(f"rotary positions need an even head_dim, got head_dim={head_dim}")
    inv = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv  # [..., seq, head_dim/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[..., None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, base: float = 10000.0) -> jnp.ndarray:
    """Rotary position embedding (Su et al. 2021, arXiv 2104.09864, eq. 34), in the
    half-split layout: pairs are (x[i], x[i + d/2]). x: `[..., seq, heads, head_dim]`,
    positions: `[..., seq]` (broadcastable to x's leading dims)."""
    cos, sin = rope_angles(positions, x.shape[-1], base)
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def alibi_slopes(num_heads: int) -> jnp.ndarray:
    """float32 `[num_heads]` head slopes of Press et al. 2021 (arXiv 2108.12409,
    sec. 3): the geometric sequence 2^(-8/n), 2^(-16/n), ...; for n not a power of
    two, the slopes of the closest smaller power of two followed by every other
    slope of the next one."""
    positive_int("num_heads", num_heads)

    def power_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = power_of_two(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: num_heads - closest]
    return jnp.asarray(slopes, jnp.float32)


def alibi_bias(num_heads: int, q_positions, k_positions, causal: bool) -> jnp.ndarray:
    """q_positions `[..., q]`, k_positions `[..., k]` -> float32 `[..., heads, q, k]`
    additive bias -slope * distance. Causal models see only k <= q so the distance
    is q - k; bidirectional encoders use |q - k|."""
    dist = q_positions[..., :, None].astype(jnp.float32) - k_positions[..., None, :]
    dist = dist if causal else jnp.abs(dist)
    return -alibi_slopes(num_heads)[:, None, None] * dist[..., None, :, :]
