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

from transformer_jax.attention import functional, masks as masks_lib


@dataclasses.dataclass(frozen=True)
class AttentionVariant:
    """A registered kernel: `fn` (see the module docstring for its signature and
    shapes) and what it supports, which `MultiHeadAttention` checks before calling it."""
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
    # Computes full softmax attention, the same function as `xla` for every mask it
    # accepts (not a window, a sparse pattern or an approximation): models using it
    # can be exported to libraries that compute attention densely (hf/config.py).
    exact: bool = False
    # Attends from queries of one length to keys of another under any key mask
    # (the dense kernels), so it can serve cross-attention; the position-based
    # patterns (windows, BigBird blocks, Linformer's fixed length) cannot, and
    # `blocks.cross_attention_config` replaces them by "xla" there.
    cross_attention: bool = False
    # Keyword arguments the kernel reads at call time (`MultiHeadAttention(...)(x,
    # **kwargs)`, in `extra`), e.g. Longformer's per-token global_mask; any other is
    # refused, where it used to be dropped without a word (a typo, or a kind that
    # ignores it).
    call_args: tuple[str, ...] = ()


def check_call_args(variant: AttentionVariant, kwargs) -> None:
    """ValueError naming each call-time keyword argument `variant` does not read, and
    the kinds that do."""
    for name in sorted(set(kwargs) - set(variant.call_args)):
        takers = [n for n in names() if name in _REGISTRY[n].call_args]
        raise ValueError(f"attention.kind={variant.name!r} takes no call-time argument "
                         f"{name!r}" + (f"; it is read by kind {', '.join(map(repr, takers))}"
                                        if takers else "; no kind reads it"))


_REGISTRY: dict[str, AttentionVariant] = {}


def check_inputs(variant: AttentionVariant, q, k, mask, bias) -> None:
    """`functional.check_mask_and_bias` with `variant`'s capabilities: the error a
    bad mask or bias gets from every kernel, dense or not, however it is called."""
    functional.check_mask_and_bias(q, k, mask, bias, kind=variant.name,
                                   key_only=not variant.full_mask, bias_ok=variant.supports_bias)


def _checked(variant: AttentionVariant) -> Callable[..., Any]:
    """variant.fn, validating its config's fields, its mask and its bias at entry (issue
    17: sparse kernels called through the registry read a too-short key mask as
    padding; a config of window=-1 gave zeros)."""
    def fn(q, k, v, *, mask, bias, **kwargs):
        if variant.validate is not None:   # no position here: no ALiBi bias to refuse
            dropout = 0.0 if kwargs.get("deterministic", True) else kwargs.get("dropout_rate")
            variant.validate(kwargs["config"], causal=kwargs.get("causal", False),
                             position=None, attention_dropout=dropout)
        check_inputs(variant, q, k, mask, bias)
        return variant.fn(q, k, v, mask=mask, bias=bias, **kwargs)
    return fn


def register(variant: AttentionVariant) -> AttentionVariant:
    """Makes `variant` selectable as `AttentionConfig(kind=variant.name)`; the stored
    (and returned) variant's `fn` checks its mask and bias first."""
    variant = dataclasses.replace(variant, fn=_checked(variant))
    _REGISTRY[variant.name] = variant
    return variant


def names() -> tuple[str, ...]:
    """The registered kinds, sorted."""
    return tuple(sorted(_REGISTRY))


def get(name: str) -> AttentionVariant:
    """The variant called `name`; ValueError listing the valid names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"attention.kind={name!r} is not a known attention; valid: {', '.join(names())}")
    return _REGISTRY[name]


def validate(config, *, causal: bool, position: str, attention_dropout: float) -> None:
    """Raises ValueError if `config.kind` cannot honour causality, this position
    encoding or attention dropout; called when a model config is built."""
    variant = get(config.kind)
    if variant.validate is not None:
        variant.validate(config, causal=causal, position=position,
                         attention_dropout=attention_dropout)


def _xla(q, k, v, *, mask, bias, causal, config, extra, dropout_rate, dropout_rng, deterministic):
    del config, extra
    return functional.dot_product_attention(
        q, k, v, mask=mask, bias=bias, causal=causal, dropout_rate=dropout_rate,
        dropout_rng=dropout_rng, deterministic=deterministic)


register(AttentionVariant("xla", _xla, exact=True, cross_attention=True))


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
    return flash_attention(q, k, v, mask=mask, bias=bias, causal=causal, implementation="cudnn")


def flash_attention(q, k, v, *, mask=None, bias=None, causal=False, implementation="cudnn"):
    """`jax.nn.dot_product_attention` on our shapes (`[..., seq, heads, head_dim]`,
    masks/biases broadcastable to `[..., heads, q_len, kv_len]`).

    cuDNN takes a general mask only as an additive `[B, N|1, q_len, kv_len]` bias
    (and then also computes its gradient). A key padding mask `[..., 1, 1, kv_len]`
    on bidirectional attention goes a cheaper way: softmax attention does not
    depend on the order of the keys, so each row's valid keys are moved to the
    front (a stable argsort of the mask) and cuDNN is told how many there are
    (`key_value_seq_lengths`). That is exact for any padding pattern, left, right
    or holes, without a data-dependent branch (a conditional on GPU reads its
    predicate on the host). Rows with no valid key attend to their first key
    instead of uniformly to all; both are padding. `implementation="xla"` runs the
    same code on any backend (the tests' way).
    """
    functional.check_mask_and_bias(q, k, mask, bias)
    lead = q.ndim - 3
    batch_shape = functional.scores_shape(q, k)[:-3]
    q4, k4, v4 = (_flatten_batch(jnp.broadcast_to(x, (*batch_shape, *x.shape[-3:])), lead)
                  for x in (q, k, v))
    q_len, kv_len = q.shape[-3], k.shape[-3]

    def call(k4, v4, mask4=None, bias4=None, lengths=None):
        out = jax.nn.dot_product_attention(q4, k4, v4, bias=bias4, mask=mask4, is_causal=causal,
                                           key_value_seq_lengths=lengths,
                                           implementation=implementation)
        return out.reshape(*batch_shape, *q.shape[-3:])   # a query batch broadcast to k/v's

    def four_d(x):  # `[..., h|1, q|1, kv]`, or `[q|1, kv]`, -> `[B, h|1, q_len, kv_len]`
        heads = x.shape[-3] if x.ndim >= 3 else 1
        return _flatten_batch(jnp.broadcast_to(x, (*batch_shape, heads, q_len, kv_len)), lead)

    bias4 = None if bias is None else four_d(bias).astype(q.dtype)
    if mask is None:
        return call(k4, v4, bias4=bias4)
    if causal or bias is not None or not masks_lib.is_key_padding(mask):
        return call(k4, v4, mask4=four_d(mask), bias4=bias4)  # positions matter: no reordering
    keys = _flatten_batch(jnp.broadcast_to(mask, (*batch_shape, 1, 1, kv_len)), lead)[:, 0, 0]
    order = jnp.argsort(~keys, axis=-1, stable=True)   # valid keys first
    k4, v4 = (_permute_rows(x, order) for x in (k4, v4))
    lengths = jnp.maximum(keys.sum(-1, dtype=jnp.int32), 1)
    return call(k4, v4, lengths=lengths)


@jax.custom_vjp
def _permute_rows(x, order):
    """x `[B, S, ...]` reordered along S by a permutation `order [B, S]`. Its gradient is
    the inverse permutation, again a gather: autodiff of a gather would scatter-add,
    which on a GPU accumulates with atomics, as it cannot know the rows are distinct."""
    return jnp.take_along_axis(x, order.reshape(*order.shape, *(1,) * (x.ndim - 2)), axis=1)


def _permute_rows_fwd(x, order):
    return _permute_rows(x, order), order


def _permute_rows_bwd(order, g):
    return _permute_rows(g, jnp.argsort(order, axis=-1)), None


_permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def cudnn_applies(q, k, *, mask, bias, causal, dropout_rate, deterministic) -> bool:
    """Whether `kind="auto"` hands this call to cuDNN: a GPU, bf16/fp16, no attention
    dropout, no additive bias, no mask beyond key padding of bidirectional attention
    (so not cached decoding), equal Q and K/V head counts and a head_dim cuDNN's
    flash kernel supports."""
    head_dim = q.shape[-1]
    key_padding = mask is None or (not causal and masks_lib.is_key_padding(mask))
    return (cudnn_unavailable_reason(q.dtype) is None and (deterministic or not dropout_rate)
            and bias is None and key_padding and q.shape[-2] == k.shape[-2]
            and head_dim % 8 == 0 and head_dim <= 128)


# The kernels `kind="auto"` may choose, in order, before falling back to "xla":
# (name, applies(q, k, *, mask, bias, causal, dropout_rate, deterministic) -> bool).
# Each targets one backend (cuDNN a GPU, splash a TPU), so at most one applies.
_AUTO: list[tuple[str, Callable[..., bool]]] = []


def register_auto(name: str, applies: Callable[..., bool]) -> None:
    """Lets `kind="auto"` run the registered kind `name` on calls where `applies`."""
    _AUTO.append((name, applies))


def auto_kind(q, k, *, mask, bias, causal, dropout_rate, deterministic) -> str:
    """The kind `kind="auto"` runs for this call: the first of `_AUTO` that applies, else "xla"."""
    for name, applies in _AUTO:
        if applies(q, k, mask=mask, bias=bias, causal=causal, dropout_rate=dropout_rate,
                   deterministic=deterministic):
            return name
    return "xla"


def _auto(q, k, v, *, mask, bias, causal, config, extra, dropout_rate, dropout_rng, deterministic):
    kind = auto_kind(q, k, mask=mask, bias=bias, causal=causal, dropout_rate=dropout_rate,
                     deterministic=deterministic)
    return get(kind).fn(q, k, v, mask=mask, bias=bias, causal=causal, config=config, extra=extra,
                        dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                        deterministic=deterministic)


# The default: cuDNN flash attention on a GPU, splash attention on a TPU, where
# each applies (see `cudnn_applies`, `variants.splash.applies`), the XLA reference
# everywhere else; all compute the same function.
register(AttentionVariant("auto", _auto, exact=True, cross_attention=True))


def _validate_cudnn(config, *, causal, position, attention_dropout):
    del config, causal, position
    if attention_dropout:
        raise ValueError(
            f"attention_dropout={attention_dropout} is not supported by attention.kind='cudnn' "
            "(jax.nn.dot_product_attention has no dropout); set attention_dropout=0.0")


register(AttentionVariant("cudnn", _cudnn, validate=_validate_cudnn, supports_weights=False,
                           exact=True, cross_attention=True))
register_auto("cudnn", cudnn_applies)
