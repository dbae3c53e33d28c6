"""Attention: pure kernels, masks, the variant registry and `MultiHeadAttention`."""
from transformer_jax.attention import registry
from transformer_jax.attention.config import AttentionConfig
from transformer_jax.attention.functional import attention_weights, dot_product_attention
from transformer_jax.attention.masks import (causal_mask, combine_masks, padding_mask,
                                             padding_mask_from_lengths)
from transformer_jax.attention import variants  # noqa: F401  (registers the efficient kernels)
from transformer_jax.attention.multihead import MultiHeadAttention

__all__ = [
    "AttentionConfig", "MultiHeadAttention", "attention_weights", "causal_mask",
    "combine_masks", "dot_product_attention", "padding_mask", "padding_mask_from_lengths",
    "registry",
]
