"""Losses of the three pre-training tasks, always computed in float32.

Logits arrive in the model's compute dtype (maybe bfloat16); they are upcast
before log-softmax, whose sums of exponentials lose too much in 8 mantissa bits.
Every loss is a weighted mean over the positions that count (weights 0 elsewhere)
and returns, besides the scalar, the statistics needed to report accuracy and
perplexity and to average correctly across batches (`weight` = target count).
"""
from __future__ import annotations

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


def weighted_mean(values, weights):
    """sum(values * weights) / sum(weights); 0 (not NaN) when every weight is 0."""
    weights = weights.astype(jnp.float32)
    total = weights.sum()
    return (values * weights).sum() / jnp.maximum(total, 1e-8), total


def _token_loss(logits, labels, weights, label_smoothing: float = 0.0) -> dict:
    loss, nll = token_cross_entropy(logits, labels, label_smoothing)
    mean_loss, weight = weighted_mean(loss, weights)
    mean_nll, _ = weighted_mean(nll, weights)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    accuracy, _ = weighted_mean(correct, weights)
    return {"loss": mean_loss, "nll": mean_nll, "accuracy": accuracy, "weight": weight}


def mlm_loss(mlm_logits, mlm_ids, mlm_weights) -> dict:
    """Masked-LM loss over the predicted positions only (Devlin et al. 2018, sec. 3.1).

    mlm_logits `[B, P, V]`, mlm_ids `[B, P]`, mlm_weights `[B, P]` (0 on padding)."""
    return _token_loss(mlm_logits, mlm_ids, mlm_weights)


def nsp_loss(nsp_logits, nsp_labels) -> dict:
    """Next-sentence prediction: nsp_logits `[B, 2]`, nsp_labels `[B]` (1 = random next)."""
    return _token_loss(nsp_logits, nsp_labels, jnp.ones(nsp_labels.shape, jnp.float32))


def lm_loss(logits, targets, loss_mask) -> dict:
    """Causal LM: logits `[B, L, V]` at each position predict targets `[B, L]` (the
    next token); loss_mask `[B, L]` is 0 on padding."""
    return _token_loss(logits, targets, loss_mask)


def seq2seq_loss(logits, tgt_out, tgt_mask, label_smoothing: float = 0.0) -> dict:
    """Translation loss: logits `[B, T, V]` vs tgt_out `[B, T]` over tgt_mask `[B, T]`,
    label-smoothed as in Vaswani et al. 2017 (eps = 0.1 there). "loss" is the
    smoothed objective; "nll" (and so perplexity) is the unsmoothed one."""
    return _token_loss(logits, tgt_out, tgt_mask, label_smoothing)
