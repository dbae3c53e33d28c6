"""`MultiHeadAttention`: the module that owns the Q/K/V/output projections and
calls a kernel from the registry. Shapes: inputs `[..., seq, features]`; heads are
split as `[..., seq, heads, head_dim]` (Vaswani et al. 2017, arXiv 1706.03762, 3.2.2).
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Callable

import flax.linen as nn
from flax.core import meta
import jax
import jax.numpy as jnp

from transformer_jax import partitioning as logical, positional, validation
from transformer_jax.attention import functional, masks as masks_lib, registry
from transformer_jax.attention.config import AttentionConfig

Initializer = Callable[..., Any]
default_init = nn.initializers.normal(stddev=0.02)
# "cache" entries of a decoding cross-attention: the projected memory keys/values
# `[..., src_len, kv_heads, head_dim]` and whether they have been filled.
MEMORY_CACHE_KEYS = ("cached_memory_key", "cached_memory_value")
MEMORY_READY_KEY = "memory_ready"


class HeadProjection(nn.Module):
    """The parameters of one `[features] -> [heads, head_dim]` projection, laid out as
    `nn.DenseGeneral`'s (kernel `[features, heads, head_dim]`, bias `[heads, head_dim]`),
    returned as arrays so that several can be fused into one matmul."""
    shape: tuple[int, int, int]
    use_bias: bool
    param_dtype: Any
    kernel_init: Initializer
    logical_partitioning: bool = False

    @nn.compact
    def __call__(self):
        boxed = self.logical_partitioning
        kernel = self.param("kernel", _flat_init(logical.param_init(
            self.kernel_init, logical.QKV_KERNEL, boxed)), self.shape, self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", _flat_init(logical.param_init(
                nn.initializers.zeros, logical.QKV_BIAS, boxed)), self.shape[1:], self.param_dtype)
        return kernel, bias


def _flat_init(init):
    """Initialise as `nn.DenseGeneral` does: draw `[fan_in, prod(rest)]` and reshape, so
    fan-based initializers (Xavier for DeepNorm) see the 2-D fans and draws equal
    DenseGeneral's for the same key."""
    def wrapped(rng, shape, dtype=jnp.float32):
        flat = (shape[0], math.prod(shape[1:])) if len(shape) == 3 else (math.prod(shape),)
        value = init(rng, flat, dtype)
        if isinstance(value, meta.AxisMetadata):
            return meta.replace_boxed(value, jnp.reshape(value.unbox(), shape))
        return jnp.reshape(value, shape)
    return wrapped


def project_heads(x, weights, dtype):
    """x `[..., features]` times the kernels of `weights` [(kernel `[features, h_i, head_dim]`,
    bias | None), ...] -> one `[..., h_i, head_dim]` per kernel. The kernels are
    concatenated along the head axis and applied as ONE matmul (the fused QKV
    projection): the same products and sums as separate projections, one wider GEMM."""
    kernels = [k.astype(dtype) for k, _ in weights]
    fused = kernels[0] if len(kernels) == 1 else jnp.concatenate(kernels, axis=1)
    y = jnp.einsum("...f,fhd->...hd", x.astype(dtype), fused)
    biases = [b for _, b in weights]
    if biases[0] is not None:
        y = y + (biases[0] if len(biases) == 1 else jnp.concatenate(biases, 0)).astype(dtype)
    splits = list(itertools.accumulate(k.shape[1] for k in kernels))[:-1]
    return jnp.split(y, splits, axis=-2)


class MultiHeadAttention(nn.Module):
    """Self- or cross-attention with optional grouped/multi-query K/V heads.

    Attributes:
      num_heads: query heads.
      num_kv_heads: key/value heads (None = num_heads; 1 = multi-query attention).
      head_dim: per-head width (None = features // num_heads).
      out_features: output width (None = input width).
      position: one of `positional.POSITION_KINDS`; "rope" and "alibi" are applied
        here, the others are no-ops here because additive positions are added
        to the embeddings.
    Call-time switches: `deterministic` (dropout off), `decode` (use and update
    the key/value cache in the "cache" collection; cross-attention caches the
    projected memory once, see `_memory_kv`), `sow_weights` (store the
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
    # One matmul for Q, K and V in self-attention (K and V in cross-attention)
    # instead of three; the parameters stay three separate kernels either way.
    fused_qkv: bool = True

    def _projections(self, inputs_q, inputs_kv, is_self, q_shape, kv_shape, cache_memory=False):
        """q `[..., q_len, heads, head_dim]`, k and v `[..., kv_len, kv_heads, head_dim]`.
        `cache_memory` (decoding cross-attention): k and v via `_memory_kv`."""
        def weights(name, shape, init):
            return HeadProjection(shape, self.use_bias, self.param_dtype, init,
                                  self.logical_partitioning, name=name)()
        wq = weights("query", (inputs_q.shape[-1], *q_shape), self.kernel_init)
        wk = weights("key", (inputs_kv.shape[-1], *kv_shape), self.kernel_init)
        wv = weights("value", (inputs_kv.shape[-1], *kv_shape), self.value_init or self.kernel_init)
        if cache_memory:
            k, v = self._memory_kv(lambda: self._project_kv(inputs_kv, wk, wv),
                                   (*inputs_kv.shape[:-1], *kv_shape))
            return project_heads(inputs_q, [wq], self.dtype)[0], k, v
        if not self.fused_qkv:
            return tuple(project_heads(x, [w], self.dtype)[0]
                         for x, w in ((inputs_q, wq), (inputs_kv, wk), (inputs_kv, wv)))
        if is_self:
            return tuple(project_heads(inputs_q, [wq, wk, wv], self.dtype))
        k, v = self._project_kv(inputs_kv, wk, wv)
        return project_heads(inputs_q, [wq], self.dtype)[0], k, v

    def _project_kv(self, inputs_kv, wk, wv):
        if not self.fused_qkv:
            return tuple(project_heads(inputs_kv, [w], self.dtype)[0] for w in (wk, wv))
        return tuple(project_heads(inputs_kv, [wk, wv], self.dtype))

    def _memory_kv(self, project, shape):
        """Cross-attention keys/values while decoding. The memory is fixed for the whole
        decode, so it is projected once: on the first call after the cache is created
        (`memory_ready` False), then read from the cache on every later step. `lax.cond`
        keeps one program (and one cache structure) for both cases, so a jitted decode
        loop skips the projection at run time instead of recompiling."""
        key, value = MEMORY_CACHE_KEYS
        if not self.has_variable("cache", key):   # init: only create the slots, sized by the memory
            k, v = project()
            self.variable("cache", key, jnp.zeros, k.shape, k.dtype)
            self.variable("cache", value, jnp.zeros, v.shape, v.dtype)
            self.variable("cache", MEMORY_READY_KEY, lambda: jnp.array(False))
            return k, v
        cached_k, cached_v = self.variable("cache", key), self.variable("cache", value)
        ready = self.variable("cache", MEMORY_READY_KEY)
        if shape != cached_k.value.shape:
            raise ValueError(f"cross-attention memory gives keys of shape {shape} but the "
                             f"decode cache holds {cached_k.value.shape}: create the cache "
                             "for this memory's batch and length")
        stored = cached_k.value, cached_v.value
        k, v = jax.lax.cond(ready.value, lambda: stored,
                            lambda: tuple(t.astype(s.dtype) for t, s in zip(project(), stored)))
        cached_k.value, cached_v.value, ready.value = k, v, jnp.array(True)
        return k, v

    @nn.compact
    def __call__(self, inputs_q, inputs_kv=None, *, mask=None, bias=None, causal: bool = False,
                 positions=None, deterministic: bool = True, decode: bool = False,
                 sow_weights: bool = False, **kernel_kwargs):
        """inputs_q `[..., q_len, features]`, inputs_kv `[..., kv_len, kv_features]`
        (None = self-attention); mask bool broadcastable to `[..., heads, q_len, kv_len]`;
        positions `[..., q_len]` int (defaults to arange, offset by the cache in decode)."""
        is_self = inputs_kv is None
        inputs_kv = inputs_q if is_self else inputs_kv
        self._check_fields(inputs_q, inputs_kv, causal)
        features = inputs_q.shape[-1]
        kv_heads = self.num_kv_heads or self.num_heads
        head_dim = self.head_dim or features // self.num_heads
        variant = registry.get(self.attention.kind)
        registry.check_call_args(variant, kernel_kwargs)

        q, k, v = self._projections(inputs_q, inputs_kv, is_self, (self.num_heads, head_dim),
                                    (kv_heads, head_dim), cache_memory=decode and not is_self)
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
                k, v, mask, k_positions, overflow = self._update_cache(cache, k, v, mask)
                # Traced past the cache's end: NaN outputs, never attention over the
                # clamped slots `dynamic_update_slice` would have overwritten.
                q = jnp.where(overflow, jnp.nan, q).astype(q.dtype)
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

    def _check_fields(self, inputs_q, inputs_kv, causal):
        """The module's own fields and its AttentionConfig, checked at trace time: a
        module built directly (not from a validated TransformerConfig) gets the same
        one-line errors as a config would, naming the field."""
        validation.positive_int("num_heads", self.num_heads)
        for name in ("num_kv_heads", "head_dim", "out_features"):
            if getattr(self, name) is not None:
                validation.positive_int(name, getattr(self, name))
        validation.probability("dropout_rate", self.dropout_rate)
        validation.choice("position", self.position, positional.POSITION_KINDS)
        if not isinstance(self.attention, AttentionConfig):
            raise ValueError(f"attention={self.attention!r} must be an AttentionConfig")
        for name, x in (("inputs_q", inputs_q), ("inputs_kv", inputs_kv)):
            if jnp.ndim(x) < 2:
                raise ValueError(f"MultiHeadAttention: {name} must be [..., seq, features], "
                                 f"got shape {jnp.shape(x)}")
        kv_heads = self.num_kv_heads or self.num_heads
        if self.num_heads % kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not divisible by num_kv_heads={kv_heads}")
        if self.head_dim is None and inputs_q.shape[-1] % self.num_heads:
            raise ValueError(f"MultiHeadAttention: input width {inputs_q.shape[-1]} is not divisible "
                             f"by num_heads={self.num_heads}; set head_dim explicitly")
        registry.validate(self.attention, causal=causal, position=self.position,
                          attention_dropout=self.dropout_rate)

    def _kernel(self, variant, q, k, v, mask, bias, causal, deterministic, sow_weights, kwargs):
        registry.check_inputs(variant, q, k, mask, bias)  # before any parameter is made
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
        """Cache of shape `[..., cache_len, kv_heads, head_dim]` (`GPT.init_cache` sizes
        it), and which of its slots hold padding `[..., cache_len]` (False = a real token,
        so that a cache of zeros, as `init_cache` makes, hides nothing)."""
        return (self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype),
                self.variable("cache", "cached_value", jnp.zeros, k.shape, k.dtype),
                self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32)),
                self.variable("cache", "cached_key_padding", jnp.zeros, k.shape[:-2], bool))

    def _update_cache(self, cache, k, v, mask):
        """Writes this call's k/v at the cache index and returns the whole cache with a
        mask that lets query position p see the cached positions <= p that hold real
        tokens, and whether this call ran past the cache's end (traced index only).

        `mask` is either over this call's keys, `[..., 1, 1, q_len]` (a key padding
        mask, the models' attention_mask: stored with the keys, so a padded prompt
        token stays hidden at every later step), or over every cache slot
        `[..., cache_len]` (Flax's convention), used as given."""
        cached_k, cached_v, index, padding = cache
        q_len, cache_len = k.shape[-3], cached_k.value.shape[-3]
        i = index.value
        try:
            end = int(i) + q_len
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
            end = None
        if end is not None and end > cache_len:
            raise ValueError(f"decode: {q_len} new token(s) at cache index {int(i)} run past the "
                             f"cache of {cache_len} slots; size it for every token "
                             f"(init_cache(model, batch, cache_len >= {end}))")
        cached_k.value = jax.lax.dynamic_update_slice_in_dim(cached_k.value, k.astype(cached_k.value.dtype), i, axis=-3)
        cached_v.value = jax.lax.dynamic_update_slice_in_dim(cached_v.value, v.astype(cached_v.value.dtype), i, axis=-3)
        index.value = i + q_len
        if mask is not None and mask.shape[-1] == q_len != cache_len:
            if not masks_lib.is_key_padding(mask):
                raise ValueError(f"decode: a mask over this call's {q_len} keys must be a key "
                                 f"padding mask [..., 1, 1, {q_len}], got shape {mask.shape}; "
                                 f"give a mask over all {cache_len} cache slots instead")
            keys = jnp.broadcast_to(mask.reshape(mask.shape[:-3] + (q_len,)),
                                    padding.value.shape[:-1] + (q_len,))
            padding.value = jax.lax.dynamic_update_slice_in_dim(padding.value, ~keys, i, axis=-1)
            mask = None
        elif mask is not None and mask.shape[-1] not in (1, cache_len):
            raise ValueError(f"decode: mask has {mask.shape[-1]} keys; give this call's "
                             f"{q_len} or all {cache_len} cache slots")
        k_positions = jnp.arange(cache_len)
        visible = (k_positions[None, :] <= (i + jnp.arange(q_len))[:, None])[None]
        mask = masks_lib.combine_masks(mask, visible, masks_lib.padding_mask(~padding.value))
        return cached_k.value, cached_v.value, mask, k_positions, i + q_len > cache_len
