"""AdamW with a weight-decay mask, global-norm clipping and gradient accumulation.

Decoupled weight decay (Loshchilov & Hutter 2019, arXiv 1711.05101) applies to
matrices only. Following BERT's and GPT-2's reference code, biases and the
LayerNorm/RMSNorm scales and shifts are not decayed: shrinking a norm scale towards 0
switches the layer off rather than regularising it, and biases add no capacity
worth penalising. Embedding tables are decayed by default, as in BERT (which
excludes only LayerNorm and bias) and nanoGPT; `decay_embeddings=False` exempts
them as minGPT does (its "blacklist" of nn.Embedding).

`make_optimizer`'s AdamW skips a step whose gradient (or loss, through
`apply_grads`) is not finite, leaving moments and counts as they were
(`SkipsNonFinite`); on finite steps it is optax.adamw bit for bit.

Parameters stay in `param_dtype` (float32: the master weights) whatever the
compute dtype; Adam's moments match them, so bfloat16 compute needs no loss scaling.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import optax

NORM_SCALES = ("scale",)            # nn.LayerNorm / nn.RMSNorm parameter names
NO_DECAY_LEAVES = ("bias",) + NORM_SCALES
EMBEDDING_LEAVES = ("embedding",)   # nn.Embed


def _is_norm_path(path: tuple[str, ...]) -> bool:
    # A norm's shift is called "bias" and is caught by name; its module name
    # ("final_norm", "mlp_norm", "norm", ...) is checked too so a norm with other
    # parameter names is not silently decayed.
    return any(part == "norm" or part.endswith("_norm") for part in path[:-1])


def decay_mask(params, decay_embeddings: bool = True):
    """Tree of bools like `params` (one per array, whatever its shape): True where
    AdamW applies weight decay (matrices and, by default, embedding tables)."""
    def decays(path: tuple[str, ...]) -> bool:
        leaf = path[-1]
        if leaf in NO_DECAY_LEAVES or _is_norm_path(path):
            return False
        return decay_embeddings or leaf not in EMBEDDING_LEAVES
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: decays(tuple(map(str, path))) for path in flat})


def make_optimizer(learning_rate: float | optax.Schedule, *, weight_decay: float = 0.01,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   clip_norm: float | None = 1.0, accumulation_steps: int = 1,
                   decay_embeddings: bool = True) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(masked decay), accumulated over `accumulation_steps`
    calls by `optax.MultiSteps` (the mean gradient of k micro-batches is applied on the
    k-th call; the schedule then counts optimizer updates, not micro-batches). Updates,
    Adam moments and the accumulator have the parameters' shapes and dtypes."""
    for name, value, ok in (("weight_decay", weight_decay, weight_decay >= 0),
                            ("b1", b1, 0 <= b1 < 1), ("b2", b2, 0 <= b2 < 1), ("eps", eps, eps >= 0)):
        if not ok or not math.isfinite(value):
            raise ValueError(f"{name}={value!r} is out of range")
    if clip_norm is not None and not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ValueError(f"clip_norm={clip_norm!r} must be a positive number or None (no clipping)")
    if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ValueError(f"accumulation_steps={accumulation_steps!r} must be a positive integer")
    # optax.adamw's chain, with Adam's moments and the schedule's count kept on a
    # non-finite step (see `SkipsNonFinite`); the state tree is optax.adamw's.
    adamw = optax.chain(
        scale_by_adam_unless_skipped(b1, b2, eps),
        optax.add_decayed_weights(weight_decay, mask=lambda params: decay_mask(params, decay_embeddings)),
        _state_unless_skipped(optax.scale_by_learning_rate(learning_rate)))
    tx = adamw if clip_norm is None else optax.chain(optax.clip_by_global_norm(clip_norm), adamw)

    def update(grads, state, params=None, *, finite=None, **extra_args):
        if finite is None:
            finite = jnp.stack([jnp.isfinite(g).all() for g in jax.tree.leaves(grads)]).all()
        return tx.update(grads, state, params, finite=finite, **extra_args)
    optimizer = SkipsNonFinite(tx.init, update)
    if accumulation_steps == 1:
        return optimizer
    return optax.MultiSteps(optimizer, every_k_schedule=accumulation_steps).gradient_transformation()


class SkipsNonFinite(optax.GradientTransformationExtraArgs):
    """An optimizer whose `update(..., finite=False)` (or a non-finite gradient) leaves
    its whole state as it was and returns NaN updates; `make_optimizer` builds one.

    Why not select the old state afterwards, as `training.apply_grads` does for any
    other optimizer: XLA then computes the new moments twice, once for the select
    and once inside the parameter update, and the second reads the old moments
    after the first overwrote their donated buffers in place, so it copies both
    moment trees every step. Selecting inside Adam, before the parameter update
    reads the moments, leaves one kernel per leaf that reads the old moments once
    (on CPU, bert-tiny's update: 19.7 ms with the copies, 7.8 ms without)."""
    __slots__ = ()


def scale_by_adam_unless_skipped(b1: float, b2: float, eps: float) -> optax.GradientTransformationExtraArgs:
    """`optax.scale_by_adam` (same state, same arithmetic, Kingma & Ba 2015,
    arXiv 1412.6980) whose moments and count stay as they were when the extra
    argument `finite` is False, in which case the updates are NaN."""
    tree = optax.tree_utils

    def update(updates, state, params=None, *, finite=True, **extra_args):
        del params, extra_args
        keep = functools.partial(tree.tree_where, finite)
        mu = keep(tree.tree_update_moment(updates, state.mu, b1, 1), state.mu)
        nu = keep(tree.tree_update_moment_per_elem_norm(updates, state.nu, b2, 2), state.nu)
        count = jnp.where(finite, optax.safe_increment(state.count), state.count)
        mu_hat, nu_hat = tree.tree_bias_correction(mu, b1, count), tree.tree_bias_correction(nu, b2, count)
        out = jax.tree.map(lambda m, v: jnp.where(finite, m / (jnp.sqrt(v) + eps), jnp.nan), mu_hat, nu_hat)
        return out, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)
    return optax.GradientTransformationExtraArgs(optax.scale_by_adam(b1, b2, eps).init, update)


def _state_unless_skipped(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """`inner` whose (small: a schedule's step count) state is kept when `finite` is False."""
    def update(updates, state, params=None, *, finite=True, **extra_args):
        updates, new = inner.update(updates, state, params)
        return updates, optax.tree_utils.tree_where(finite, new, state)
    return optax.GradientTransformationExtraArgs(inner.init, update)


def learning_rate_fn(learning_rate: float | optax.Schedule,
                     accumulation_steps: int = 1) -> Callable[[Any], Any]:
    """int micro-step (scalar) -> the scalar learning rate of the optimizer update that
    step contributes to."""
    schedule = learning_rate if callable(learning_rate) else optax.constant_schedule(learning_rate)
    return lambda step: schedule(step // accumulation_steps)
