"""Input checks shared by the models: they run at trace time on static shapes,
so a bad shape fails with a readable message instead of deep inside XLA."""
from __future__ import annotations

import jax.numpy as jnp

from transformer_jax.attention import masks


def check_length(input_ids, max_len: int, field: str = "input_ids") -> None:
    """ValueError naming `field` if ids `[..., seq]` are longer than `max_len`."""
    seq = input_ids.shape[-1]
    if seq > max_len:
        raise ValueError(f"{field} has sequence length {seq} (shape {tuple(input_ids.shape)}) "
                         f"but the model's max_len is {max_len}")


def key_padding_mask(attention_mask, input_ids, field: str = "attention_mask"):
    """`[..., seq]` validity (True/1 = real token) -> key mask `[..., 1, 1, seq]`."""
    if attention_mask is None:
        return None
    attention_mask = jnp.asarray(attention_mask)
    if attention_mask.shape[-1] != input_ids.shape[-1] or attention_mask.ndim > input_ids.ndim:
        raise ValueError(f"{field} of shape {tuple(attention_mask.shape)} does not match "
                         f"input_ids of shape {tuple(input_ids.shape)}; expected [..., seq] "
                         "broadcastable to it")
    return masks.padding_mask(attention_mask.astype(bool))
