"""`MultiHeadAttention`: the module that owns the Q/K/V/output projections and
calls a kernel from the registry. Shapes: inputs `[..., seq, features]`; heads are
split as `[..., seq, heads, head_dim]` (Vaswani et al. 2017, arXiv 1706.03762, 3.2.2).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax import partitioning as logical, positional
from transformer_jax.attention import functional, masks as masks_lib, registry
from transformer_jax.attention.config import AttentionConfig

Initializer = Callable[..., Any]
default_init = nn.initializers.normal(stddev=0.02)


class MultiHeadAttention(nn.Module):
    """Self- or cross-attention with optional grouped/multi-query K/V heads.

    Attributes:
      num_heads: query heads.
      num_kv_heads: key/value heads (None = num_heads; 1 = multi-query attention).
      head_dim: per-head width (None = features // num_heads).
      out_features: output width (None = input width).
      position: "rope" or "alibi" are applied here; anything else is a no-op
        because additive positions are added to the embeddings.
    Call-time switches: `deterministic` (dropout off), `decode` (use and update
    the key/value cache in the "cache" collection), `sow_weights` (store the
    probabilities in "intermediates" under "attention_weights").
    """
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    out_features: int | None = None
    attention: AttentionConfig = AttentionConfig()
    dropout_rate: float = 0.0
    use_bias: bool = True
    position: str = "none"
    rope_base: float = 10000.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = default_init
    # Separate init for W_v and W_o: DeepNorm scales exactly those by beta.
    value_init: Initializer | None = None
    out_init: Initializer | None = None
    # Box parameters with logical axis names (TransformerConfig.logical_partitioning).
    logical_partitioning: bool = False

    def _dense(self, features: int, name: str, init) -> nn.DenseGeneral:
        """[..., features_in] -> [..., heads, head_dim]."""
        boxed = self.logical_partitioning
        return nn.DenseGeneral(features, use_bias=self.use_bias, dtype=self.dtype,
                               param_dtype=self.param_dtype, name=name,
                               kernel_init=logical.param_init(init, logical.QKV_KERNEL, boxed),
                               bias_init=logical.param_init(nn.initializers.zeros, logical.QKV_BIAS,
                                                            boxed))

    @nn.compact
    def __call__(self, inputs_q, inputs_kv=None, *, mask=None, bias=None, causal: bool = False,
                 positions=None, deterministic: bool = True, decode: bool = False,
                 sow_weights: bool = False, **kernel_kwargs):
        """inputs_q `[..., q_len, features]`, inputs_kv `[..., kv_len, kv_features]`
        (None = self-attention); mask bool broadcastable to `[..., heads, q_len, kv_len]`;
        positions `[..., q_len]` int (defaults to arange, offset by the cache in decode)."""
        is_self = inputs_kv is None
        inputs_kv = inputs_q if is_self else inputs_kv
        features = inputs_q.shape[-1]
        kv_heads = self.num_kv_heads or self.num_heads
        head_dim = self.head_dim or features // self.num_heads
        if self.num_heads % kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not divisible by num_kv_heads={kv_heads}")
        variant = registry.get(self.attention.kind)

        q = self._dense((self.num_heads, head_dim), "query", self.kernel_init)(inputs_q)
        k = self._dense((kv_heads, head_dim), "key", self.kernel_init)(inputs_kv)
        v = self._dense((kv_heads, head_dim), "value", self.value_init or self.kernel_init)(inputs_kv)
        q, k, v = (logical.constrain(t, logical.PER_HEAD) for t in (q, k, v))

        q_len = q.shape[-3]
        offset = 0
        if decode and is_self:
            offset = self._cache_offset()
        if positions is None:
            positions = offset + jnp.arange(q_len)
        k_positions = positions
        if self.position == "rope" and is_self:
            q = positional.apply_rope(q, positions, self.rope_base)
            k = positional.apply_rope(k, positions, self.rope_base)

        if decode and is_self:
            if not variant.supports_decode:
                raise ValueError(f"attention.kind={variant.name!r} has no cached decoding; "
                                 "decode with kind='xla' (the same parameters work)")
            initialized = self.has_variable("cache", "cached_key")
            cache = self._cache_vars(k)
            if initialized:  # on the init call the cache is only created, sized by the input
                k, v, mask, k_positions = self._update_cache(cache, k, v, mask)
                causal = False
        if self.position == "alibi" and is_self:
            alibi = positional.alibi_bias(self.num_heads, positions, k_positions, causal or decode)
            bias = alibi if bias is None else bias + alibi
        out = self._kernel(variant, q, k, v, mask, bias, causal, deterministic, sow_weights,
                           kernel_kwargs)
        out = logical.constrain(out, logical.PER_HEAD)
        out_features = self.out_features or features
        boxed = self.logical_partitioning
        out_init = logical.param_init(self.out_init or self.kernel_init, logical.OUT_KERNEL, boxed)
        bias_init = logical.param_init(nn.initializers.zeros, (logical.EMBED,), boxed)
        return nn.DenseGeneral(out_features, axis=(-2, -1), use_bias=self.use_bias,
                               dtype=self.dtype, param_dtype=self.param_dtype,
                               kernel_init=out_init, bias_init=bias_init, name="out")(out)

    def _kernel(self, variant, q, k, v, mask, bias, causal, deterministic, sow_weights, kwargs):
        target = functional.scores_shape(q, k)
        functional.check_broadcast("mask", mask, target)
        functional.check_broadcast("bias", bias, target)
        if mask is not None and not variant.full_mask and not masks_lib.is_key_only(mask):
            raise ValueError(
                f"attention.kind={variant.name!r} takes only key padding masks of shape "
                f"[..., 1, kv_len]; got a query-dependent mask of shape {tuple(mask.shape)}")
        if bias is not None and not variant.supports_bias:
            raise ValueError(f"attention.kind={variant.name!r} does not support an additive bias "
                             "(e.g. ALiBi); use position='learned', 'sinusoidal' or 'rope'")
        rng = None
        if not deterministic and self.dropout_rate > 0.0:
            rng = self.make_rng("dropout")
        extra = {}
        if variant.make_extra is not None:
            extra = variant.make_extra(self, self.attention, q_len=q.shape[-3], kv_len=k.shape[-3],
                                       num_heads=q.shape[-2], num_kv_heads=k.shape[-2],
                                       head_dim=q.shape[-1])
        if sow_weights:
            if not variant.supports_weights:
                raise ValueError(f"attention.kind={variant.name!r} cannot return attention weights; "
                                 "inspect them with kind='xla'")
            probs = functional.attention_weights(q, k, mask=mask, bias=bias, causal=causal)
            self.sow("intermediates", "attention_weights", probs)
        return variant.fn(q, k, v, mask=mask, bias=bias, causal=causal, config=self.attention,
                          extra={**extra, **kwargs}, dropout_rate=self.dropout_rate,
                          dropout_rng=rng, deterministic=deterministic)

    def _cache_offset(self):
        if not self.has_variable("cache", "cache_index"):
            return 0
        return self.get_variable("cache", "cache_index")

    def _cache_vars(self, k):
        """Cache of shape `[..., cache_len, kv_heads, head_dim]`; `GPT.init_cache` sizes it."""
        return (self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype),
                self.variable("cache", "cached_value", jnp.zeros, k.shape, k.dtype),
                self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32)))

    def _update_cache(self, cache, k, v, mask):
        """Writes this call's k/v at the cache index and returns the whole cache with a
        mask that lets query position p see cached positions <= p."""
        cached_k, cached_v, index = cache
        q_len, cache_len = k.shape[-3], cached_k.value.shape[-3]
        i = index.value
        cached_k.value = jax.lax.dynamic_update_slice_in_dim(cached_k.value, k.astype(cached_k.value.dtype), i, axis=-3)
        cached_v.value = jax.lax.dynamic_update_slice_in_dim(cached_v.value, v.astype(cached_v.value.dtype), i, axis=-3)
        index.value = i + q_len
        k_positions = jnp.arange(cache_len)
        visible = (k_positions[None, :] <= (i + jnp.arange(q_len))[:, None])[None]
        return cached_k.value, cached_v.value, masks_lib.combine_masks(mask, visible), k_positions
