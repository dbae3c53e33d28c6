"""Token cross-entropy as pure functions, whole or in chunks of tokens.

The loss is always taken in float32: logits may arrive in bfloat16, whose 8
mantissa bits lose too much in the sum of exponentials. The chunked form exists
for large vocabularies: GPT-2's 12 x 1024 tokens x 50304 logits are 2.5 GB in
float32, and `chunked_token_stats` never holds more than one chunk of them
(forward or backward), at the price of recomputing each chunk's logits in the
backward pass.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp


def token_cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """Per-position cross-entropy `[...]` (fp32) of logits `[..., vocab]` vs int labels `[...]`.

    With label smoothing eps (Szegedy et al. 2016, arXiv 1512.00567, sec. 7) the
    target is q = (1 - eps) * onehot(y) + eps / V, so
        loss = (1 - eps) * (-log p_y) + eps * mean_v(-log p_v).
    Returns (smoothed loss, plain negative log-likelihood -log p_y).
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing!r} must be in [0, 1)")
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if label_smoothing == 0.0:
        return nll, nll
    smooth = -log_probs.mean(axis=-1)
    return (1.0 - label_smoothing) * nll + label_smoothing * smooth, nll


def token_stats(logits, labels, num_classes: int | None = None) -> dict:
    """{"nll": -log p_y `[...]` fp32, "correct": argmax == label `[...]` fp32} from
    logits `[..., vocab]`: what a token loss and its accuracy need. With
    `num_classes` < vocab (a vocabulary padded for the matmul) the extra columns
    are masked inside the reductions instead of sliced off, which would copy the
    whole logits tensor."""
    logits = logits.astype(jnp.float32)
    if num_classes is not None and num_classes < logits.shape[-1]:
        column = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
        logits = jnp.where(column < num_classes, logits, -jnp.inf)
    nll, _ = token_cross_entropy(logits, labels)
    return {"nll": nll, "correct": (jnp.argmax(logits, -1) == labels).astype(jnp.float32)}


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
