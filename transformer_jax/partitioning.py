"""Logical axis names for parameters and activations (MaxText-style).

Building blocks name the axes of what they create; `transformer_jax.parallel`
maps those names to the mesh axes `data`, `fsdp` and `tensor` with rules. The
names are defined once here, weights apart from activations:

  parameters   embed (d_model), heads (attention heads), kv (head_dim),
               mlp (d_ff), vocab
  activations  activation_batch, activation_length, activation_embed,
               activation_heads, activation_kv, activation_mlp

Both helpers leave plain code untouched: `param_init` returns the initializer
itself unless the config asks for boxes (`TransformerConfig.logical_partitioning`),
and `constrain` is `nn.with_logical_constraint`, which does nothing unless
logical axis rules (`nn.logical_axis_rules`) and a mesh (`jax.set_mesh`) are
both in context.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn

EMBED = "embed"
HEADS = "heads"
KV = "kv"
MLP = "mlp"
VOCAB = "vocab"

BATCH = "activation_batch"
LENGTH = "activation_length"
ACT_EMBED = "activation_embed"
ACT_HEADS = "activation_heads"
ACT_KV = "activation_kv"
ACT_MLP = "activation_mlp"

# Parameter layouts: projections to heads `[d_model, heads, head_dim]` and back
# `[heads, head_dim, d_model]`, feed-forward `[d_model, d_ff]` / `[d_ff, d_model]`.
QKV_KERNEL = (EMBED, HEADS, KV)
QKV_BIAS = (HEADS, KV)
OUT_KERNEL = (HEADS, KV, EMBED)
UP_KERNEL = (EMBED, MLP)
DOWN_KERNEL = (MLP, EMBED)

# Activation layouts: `[batch, seq, d_model]`, `[batch, seq, heads, head_dim]`, `[batch, seq, d_ff]`.
HIDDEN = (BATCH, LENGTH, ACT_EMBED)
PER_HEAD = (BATCH, LENGTH, ACT_HEADS, ACT_KV)
MLP_HIDDEN = (BATCH, LENGTH, ACT_MLP)


def param_init(init: Callable[..., Any], names: Sequence[str | None], enabled: bool) -> Callable:
    """`init`, wrapped by `nn.with_logical_partitioning(init, names)` when `enabled`.

    names: one logical name (or None) per axis of the parameter it creates."""
    return nn.with_logical_partitioning(init, tuple(names)) if enabled else init


def constrain(x, names: Sequence[str | None]):
    """Sharding constraint on an activation by logical names, aligned to its trailing
    axes (a `[seq, d_model]` input without batch axis drops the leading name; extra
    leading axes, e.g. from vmap, stay unconstrained). A no-op outside a rules and
    mesh context."""
    names = tuple(names)[max(0, len(names) - x.ndim):]
    return nn.with_logical_constraint(x, (None,) * (x.ndim - len(names)) + names)
