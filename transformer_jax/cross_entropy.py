"""Token cross-entropy as pure functions, whole or in chunks of tokens.

The loss is always taken in float32: logits may arrive in bfloat16, whose 8
mantissa bits lose too much in the sum of exponentials. The chunked form exists
for large vocabularies: GPT-2's 12 x 1024 tokens x 50304 logits are 2.5 GB in
float32, and `chunked_token_stats` never holds more than one chunk of them
(forward or backward), at the price of recomputing each chunk's logits in the
backward pass. Either way the backward pass is written by hand (softmax minus
target in one elementwise pass), so no float32 copy of the logits is kept.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp


def token_stats(logits, labels, num_classes: int | None = None,
                label_smoothing: float = 0.0) -> dict:
    """Per-position statistics of predicting int labels `[...]` from logits `[..., vocab]`:
    {"nll": -log p_y, "loss": the label-smoothed loss (= nll when eps = 0),
     "correct": 1 where the label attains the largest logit}, all `[...]` float32.

    With label smoothing eps (Szegedy et al. 2016, arXiv 1512.00567, sec. 7) the
    target is q = (1 - eps) * onehot(y) + eps / V, so
        loss = lse - (1 - eps) * x_y - eps * mean_v(x_v),   lse = log sum_v exp(x_v).
    With `num_classes` < vocab (a vocabulary padded for the matmul) the extra
    columns are masked inside the reductions instead of sliced off, which would copy
    the whole logits tensor; V counts the real classes only.

    Hand-written backward (`jax.custom_vjp`): d loss / d x = softmax(x) - q, one
    elementwise pass that reads the logits in their own dtype and writes the
    gradient in it, with the one-hot as an iota comparison. Autodiff of
    log-softmax instead keeps float32 log-probabilities of the whole logits tensor
    for the backward pass (2.5 GB at GPT-2's 12 x 1024 x 50304) and scatters the
    label's -1 into a zero tensor. Accuracy compares the label's logit with the
    maximum the log-sum-exp takes anyway, instead of a separate argmax pass (a tie
    for the maximum counts as correct, where argmax would pick the first index).
    Reverse mode: `jax.grad`, grad of grad and Hessian-vector products as
    `jax.jvp(jax.grad(f), ...)` work; `jax.jvp` of the loss itself does not.

    A label outside [0, num_classes) gives NaN statistics ("correct" 0) and, where
    its loss is used, NaN gradients: never a plausible number. A weight of 0 (as
    `losses.weighted_mean` applies it) still ignores such a position, e.g. HF's -100.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing!r} must be in [0, 1)")
    vocab = logits.shape[-1]
    if num_classes is None or num_classes >= vocab:
        num_classes = vocab
    nll, loss, correct = _fused_stats(logits, labels.astype(jnp.int32), num_classes,
                                      float(label_smoothing))
    return {"nll": nll, "loss": loss, "correct": correct}


def _valid_columns(shape, num_classes: int):
    return jax.lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1) < num_classes


def _valid_labels(labels, num_classes: int):
    return (labels >= 0) & (labels < num_classes)


def _masked_f32(logits, num_classes: int):
    x = logits.astype(jnp.float32)
    if num_classes < logits.shape[-1]:
        x = jnp.where(_valid_columns(x.shape, num_classes), x, -jnp.inf)
    return x


def _forward(logits, labels, num_classes: int, eps: float):
    x = _masked_f32(logits, num_classes)
    top = jax.lax.stop_gradient(jnp.max(x, axis=-1))
    lse = top + jnp.log(jnp.sum(jnp.exp(x - top[..., None]), axis=-1))
    # A label outside [0, num_classes) (HF's ignore index -100, a typo) has no
    # probability: NaN, where take_along_axis alone would wrap -1 to the last class.
    valid = _valid_labels(labels, num_classes)
    x_y = jnp.take_along_axis(x, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    x_y = jnp.where(valid, x_y, jnp.nan)
    nll = lse - x_y
    loss = nll
    if eps:
        real = jnp.where(_valid_columns(x.shape, num_classes), x, 0.0)
        mean_x = jnp.sum(real, axis=-1) / num_classes
        loss = lse - (1.0 - eps) * x_y - eps * mean_x
    correct = (x_y >= top).astype(jnp.float32)
    return (nll, loss, correct), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _fused_stats(logits, labels, num_classes: int, eps: float):
    return _forward(logits, labels, num_classes, eps)[0]


def _fused_fwd(logits, labels, num_classes, eps):
    out, lse = _forward(logits, labels, num_classes, eps)
    return out, (logits, labels, lse)


def _fused_bwd(num_classes, eps, residuals, cotangents):
    logits, labels, lse = residuals
    g_nll, g_loss, _ = cotangents            # "correct" is piecewise constant: no gradient
    g = (g_nll + g_loss)[..., None]
    x = _masked_f32(logits, num_classes)
    hit = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1) == labels[..., None]
    # d nll = softmax - onehot; d loss = softmax - (1 - eps) onehot - eps / V on real columns.
    target = jnp.where(hit, (g_nll + (1.0 - eps) * g_loss)[..., None], 0.0)
    if eps:
        target = target + jnp.where(_valid_columns(x.shape, num_classes),
                                    (eps / num_classes) * g_loss[..., None], 0.0)
    grad = g * jnp.exp(x - lse[..., None]) - target
    # An invalid label's NaN loss has a NaN gradient, unless nothing reads that loss
    # (weight 0: HF-style ignored positions).
    bad = ~_valid_labels(labels, num_classes)
    grad = jnp.where(bad[..., None] & (g != 0), jnp.nan, grad).astype(logits.dtype)
    return grad, None


_fused_stats.defvjp(_fused_fwd, _fused_bwd)


def chunked_token_stats(hidden, project: Callable, labels, chunk: int,
                        num_classes: int | None = None) -> dict:
    """`token_stats(project(hidden), labels)` computed `chunk` tokens at a time.

    hidden `[..., seq, d]`, labels `[..., seq]`; `project` maps `[chunk, d]` to
    logits `[chunk, vocab]` and must be a pure function of arrays (close over the
    float32 output matrix and cast inside, so that its gradient is summed over
    chunks in float32). Each chunk is rematerialised (`jax.checkpoint`), so
    neither pass keeps more than one chunk's logits alive.
    """
    lead, (seq, d) = hidden.shape[:-2], hidden.shape[-2:]
    n = seq * math.prod(lead)
    pad = -n % chunk
    h = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0))).reshape(-1, chunk, d)
    y = jnp.pad(labels.reshape(n), (0, pad)).reshape(-1, chunk)

    @jax.checkpoint
    def one(args):
        hc, yc = args
        return token_stats(project(hc), yc, num_classes)

    stats = jax.lax.map(one, (h, y))
    return {k: v.reshape(-1)[:n].reshape(*lead, seq) for k, v in stats.items()}
