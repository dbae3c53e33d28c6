"""Boolean attention masks. Convention: True = may attend.

Masks broadcast against attention scores of shape `[..., heads, q_len, kv_len]`.
Builders return the smallest broadcastable shape so that no variant is forced to
materialise an n x n array it does not need (padding masks are `[..., 1, 1, kv]`).
"""
from __future__ import annotations

import jax.numpy as jnp


def causal_mask(q_len: int, kv_len: int | None = None, offset: int = 0) -> jnp.ndarray:
    """`[1, q_len, kv_len]` lower-triangular mask; query i sits at position offset+i."""
    kv_len = q_len if kv_len is None else kv_len
    q_pos = offset + jnp.arange(q_len)[:, None]
    k_pos = jnp.arange(kv_len)[None, :]
    return (k_pos <= q_pos)[None]


def padding_mask_from_lengths(lengths: jnp.ndarray, max_len: int) -> jnp.ndarray:
    """lengths `[...]` -> key mask `[..., 1, 1, max_len]` (True on real tokens)."""
    valid = jnp.arange(max_len) < jnp.asarray(lengths)[..., None]
    return padding_mask(valid)


def padding_mask(valid: jnp.ndarray) -> jnp.ndarray:
    """Per-token validity `[..., kv_len]` bool -> key mask `[..., 1, 1, kv_len]`."""
    valid = jnp.asarray(valid, dtype=bool)
    return valid[..., None, None, :]


def combine_masks(*masks: jnp.ndarray | None) -> jnp.ndarray | None:
    """Logical AND of the masks that are not None; the result has their broadcast
    shape (e.g. `[..., 1, 1, kv]` and `[1, q, kv]` -> `[..., 1, q, kv]`); None if all are."""
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    out = masks[0]
    for m in masks[1:]:
        out = jnp.logical_and(out, m)
    return out


def is_key_only(mask: jnp.ndarray | None) -> bool:
    """True when the mask depends only on the key position: `[kv_len]` or
    `[..., 1, kv_len]` (query axis of size 1), or no mask."""
    return mask is None or mask.ndim == 1 or mask.shape[-2] == 1


def is_key_padding(mask: jnp.ndarray | None) -> bool:
    """True when the mask depends only on the key position and not on the head:
    `[..., 1, 1, kv_len]` or fewer dims (or no mask), the key padding mask that the
    cuDNN and splash paths take as per-row key lengths."""
    return is_key_only(mask) and (mask is None or mask.ndim < 3 or mask.shape[-3] == 1)
