"""One interface for every attention kernel, chosen by name in `AttentionConfig.kind`.

A kernel is a pure function

    fn(q, k, v, *, mask, bias, causal, config, extra, dropout_rate, dropout_rng,
       deterministic) -> out `[..., q_len, heads, head_dim]`

with the shapes of `functional.dot_product_attention`. Kernels that need
parameters (Linformer's projections) or fixed random features (Performer) get
them from `make_extra(module, config, **dims)`, which runs inside the owning
`MultiHeadAttention` so that the module, not the kernel, owns every parameter.
`validate(config, *, causal, position, attention_dropout)` rejects combinations
the kernel cannot honour, at config construction time.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from transformer_jax.attention import functional


@dataclasses.dataclass(frozen=True)
class AttentionVariant:
    name: str
    fn: Callable[..., Any]
    make_extra: Callable[..., dict] | None = None
    validate: Callable[..., None] | None = None
    # Whether the kernel accepts a mask that depends on the query position
    # (`[..., q, kv]`); key-only padding masks `[..., 1, kv]` are always accepted.
    full_mask: bool = True
    supports_bias: bool = True
    # Cached incremental decoding: dense kernels attend to the cache directly.
    supports_decode: bool = True
    # Can return / sow the attention probabilities (needs them materialised).
    supports_weights: bool = True


_REGISTRY: dict[str, AttentionVariant] = {}


def register(variant: AttentionVariant) -> AttentionVariant:
    _REGISTRY[variant.name] = variant
    return variant


def names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get(name: str) -> AttentionVariant:
    if name not in _REGISTRY:
        raise ValueError(f"attention.kind={name!r} is not a known attention; valid: {', '.join(names())}")
    return _REGISTRY[name]


def validate(config, *, causal: bool, position: str, attention_dropout: float) -> None:
    variant = get(config.kind)
    if variant.validate is not None:
        variant.validate(config, causal=causal, position=position,
                         attention_dropout=attention_dropout)


def _xla(q, k, v, *, mask, bias, causal, config, extra, dropout_rate, dropout_rng, deterministic):
    del config, extra
    return functional.dot_product_attention(
        q, k, v, mask=mask, bias=bias, causal=causal, dropout_rate=dropout_rate,
        dropout_rng=dropout_rng, deterministic=deterministic)


register(AttentionVariant("xla", _xla))


def cudnn_unavailable_reason(dtype) -> str | None:
    """Why the cuDNN flash kernel cannot run here, or None if it can."""
    backend = jax.default_backend()
    if backend != "gpu":
        return f"it needs a CUDA GPU but the JAX backend is {backend!r}"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cuDNN flash attention runs in bfloat16/float16, not {jnp.dtype(dtype).name}"
    return None


def _flatten_batch(x, lead: int):
    """Collapses the `lead` leading dims of x into one (adding one when lead == 0)."""
    return x.reshape((-1, *x.shape[lead:]))


def _cudnn(q, k, v, *, mask, bias, causal, config, extra, dropout_rate, dropout_rng, deterministic):
    del config, extra, dropout_rng
    reason = cudnn_unavailable_reason(q.dtype)
    if reason:
        raise ValueError(f"attention.kind='cudnn' cannot run: {reason}. Use kind='xla' instead.")
    if dropout_rate and not deterministic:
        raise ValueError("attention.kind='cudnn' has no attention dropout; set attention_dropout=0")
    lead = q.ndim - 3
    target = functional.scores_shape(q, k)
    batch_shape = target[:-3]
    q4, k4, v4 = (_flatten_batch(jnp.broadcast_to(x, (*batch_shape, *x.shape[-3:])), lead)
                  for x in (q, k, v))
    # jax.nn.dot_product_attention wants [B, N, T, S] masks / biases.
    mask4 = None if mask is None else _flatten_batch(
        jnp.broadcast_to(mask, (*batch_shape, *mask.shape[-3:])), lead)
    bias4 = None if bias is None else _flatten_batch(
        jnp.broadcast_to(bias, (*batch_shape, *bias.shape[-3:])), lead).astype(q.dtype)
    out = jax.nn.dot_product_attention(q4, k4, v4, bias=bias4, mask=mask4, is_causal=causal,
                                       implementation="cudnn")
    return out.reshape(q.shape)


def _validate_cudnn(config, *, causal, position, attention_dropout):
    del config, causal, position
    if attention_dropout:
        raise ValueError(
            f"attention_dropout={attention_dropout} is not supported by attention.kind='cudnn' "
            "(jax.nn.dot_product_attention has no dropout); set attention_dropout=0.0")


register(AttentionVariant("cudnn", _cudnn, validate=_validate_cudnn, supports_weights=False))
