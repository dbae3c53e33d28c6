"""Losses of the three pre-training tasks, always computed in float32.

Logits arrive in the model's compute dtype (maybe bfloat16); they are upcast
before log-softmax, whose sums of exponentials lose too much in 8 mantissa bits.
Every loss is a weighted mean over the positions that count (weights 0 elsewhere)
and returns, besides the scalar, the statistics needed to report accuracy and
perplexity and to average correctly across batches (`weight` = target count).
"""
from __future__ import annotations

import jax.numpy as jnp

from transformer_jax.cross_entropy import token_stats


def weighted_mean(values, weights):
    """sum(values * weights) / sum(weights); 0 (not NaN) when every weight is 0. A
    position of weight 0 is left out, not multiplied by 0: its value may be NaN (an
    ignored label, `cross_entropy.token_stats`) and 0 * NaN is NaN."""
    weights = weights.astype(jnp.float32)
    total = weights.sum()
    values = jnp.where(weights != 0, values, 0.0)
    return (values * weights).sum() / jnp.maximum(total, 1e-8), total


def _token_loss(logits, labels, weights, label_smoothing: float = 0.0) -> dict:
    return loss_from_token_stats(token_stats(logits, labels, label_smoothing=label_smoothing),
                                 weights)


def mlm_loss(mlm_logits, mlm_ids, mlm_weights) -> dict:
    """Masked-LM loss over the predicted positions only (Devlin et al. 2018, sec. 3.1).

    mlm_logits `[B, P, V]`, mlm_ids `[B, P]`, mlm_weights `[B, P]` (0 on padding)."""
    return _token_loss(mlm_logits, mlm_ids, mlm_weights)


def nsp_loss(nsp_logits, nsp_labels) -> dict:
    """Next-sentence prediction: nsp_logits `[B, 2]`, nsp_labels `[B]` (1 = random next)."""
    return _token_loss(nsp_logits, nsp_labels, jnp.ones(nsp_labels.shape, jnp.float32))


def loss_from_token_stats(stats, weights) -> dict:
    """{"loss", "nll", "accuracy", "weight"} from per-token {"nll", "loss", "correct"}
    `[B, L]` (`cross_entropy.token_stats`, or `GPT.token_stats`, maybe computed in
    chunks) and weights `[B, L]`."""
    mean_nll, weight = weighted_mean(stats["nll"], weights)
    mean_loss, _ = weighted_mean(stats["loss"], weights)
    accuracy, _ = weighted_mean(stats["correct"], weights)
    return {"loss": mean_loss, "nll": mean_nll, "accuracy": accuracy, "weight": weight}


def lm_loss(logits, targets, loss_mask) -> dict:
    """Causal LM from logits in hand: logits `[B, L, V]` at each position predict
    targets `[B, L]` (the next token); loss_mask `[B, L]` is 0 on padding. For
    scoring logits already computed (the GPT notebook compares kernels' logits);
    the training step instead takes `GPT.token_stats` (chunked when `loss_chunk`
    is set, no whole fp32 logits) through `loss_from_token_stats`: the same numbers."""
    return _token_loss(logits, targets, loss_mask)


def seq2seq_loss(logits, tgt_out, tgt_mask, label_smoothing: float = 0.0) -> dict:
    """Translation loss: logits `[B, T, V]` vs tgt_out `[B, T]` over tgt_mask `[B, T]`,
    label-smoothed as in Vaswani et al. 2017 (eps = 0.1 there). "loss" is the
    smoothed objective; "nll" (and so perplexity) is the unsmoothed one."""
    return _token_loss(logits, tgt_out, tgt_mask, label_smoothing)
