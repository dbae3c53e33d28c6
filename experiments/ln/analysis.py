"""From a run's curves to what the report counts: divergence, spikes, plateau, targets.

    diverged   a step's loss, gradient or update was not finite (the step then
               skips its update), or a validation loss after step 0 exceeds the
               loss at initialization (the run blew up past where it started).
    spike      the library's definition (`training.divergence.count_spikes`, the
               rule `DivergenceMonitor` applies): a training loss more than
               SPIKE_NATS above the median of the previous SPIKE_WINDOW finite
               losses; consecutive spike steps are one spike.
    escaped    the best validation loss is PLATEAU_MARGIN nats below the unigram
               baseline: the model uses context rather than token frequencies only.
               The typical failure of post-LN without warm-up at this scale is to
               stay on that plateau (cf. Xiong et al. 2020, Fig. 2: runs that train
               "far worse" rather than producing NaNs).
"""
from __future__ import annotations

import math

import numpy as np

from transformer_jax.training import divergence as training_divergence
from transformer_jax.training.divergence import SPIKE_NATS, SPIKE_WINDOW

PLATEAU_MARGIN = 0.05


# Where each task's predicted tokens are: (ids, weights) fields of a batch.
_TARGETS = {"lm": ("targets", "loss_mask"), "mlm": ("mlm_ids", "mlm_weights"),
            "seq2seq": ("tgt_out", "tgt_mask")}


def _targets(task: str, batches: dict) -> np.ndarray:
    ids, weights = _TARGETS[task]
    return batches[ids][batches[weights] > 0]


def unigram_loss(task: str, train: dict, valid: dict, vocab_size: int) -> float:
    """Validation cross-entropy of the training set's token frequencies (add-one
    smoothed): the loss of a model that ignores context. For "mlm" it is the
    baseline of the MLM loss alone (the benchmark reports NSP apart)."""
    counts = np.bincount(_targets(task, train).ravel(), minlength=vocab_size) + 1.0
    log_p = np.log(counts / counts.sum())
    return -float(np.mean(log_p[_targets(task, valid)]))


def divergence(val_steps, val_loss, finite) -> tuple[int | None, str]:
    """(first step at which the run diverged, why) or (None, "")."""
    candidates = []
    bad = np.flatnonzero(np.asarray(finite) == 0)
    if bad.size:
        candidates.append((int(bad[0]), "non-finite loss or gradient"))
    val = np.asarray(val_loss, np.float64)
    up = np.flatnonzero(~np.isfinite(val[1:]) | (val[1:] > val[0]))
    if up.size:
        candidates.append((int(val_steps[up[0] + 1]), "validation loss above its initial value"))
    return min(candidates) if candidates else (None, "")


def count_spikes(loss, grad_norm, finite) -> int:
    """Spike events of a run's training curve; a step that diverged (non-finite loss
    or gradient, or finite=0: `training.is_diverged`) is neither a spike nor history."""
    kept = [float(l) if math.isfinite(g) and f else math.nan
            for l, g, f in zip(np.asarray(loss, np.float64), np.asarray(grad_norm, np.float64),
                               np.asarray(finite))]
    return training_divergence.count_spikes(kept)


def run_record(spec, result, index: int, unigram: float, fingerprint: str) -> dict:
    """The JSON record of run `index` of a `sweep.GroupResult`."""
    m = {k: np.asarray(v[index]) for k, v in result.metrics.items()}
    # Rounded once, so that final/best losses equal entries of the stored curve.
    val = np.round(np.asarray(result.val_loss[index], np.float64), 5)
    diverged_at, reason = divergence(result.val_steps, val, m["finite"])
    finite_val = val[np.isfinite(val)]
    best = float(finite_val.min()) if finite_val.size else math.nan
    return {
        "fingerprint": fingerprint, "run_id": spec.run_id, "task": spec.task,
        "placement": spec.placement, "peak_lr": spec.peak_lr, "warmup": spec.warmup,
        "decay": spec.decay,
        "seed": spec.seed, "steps": int(m["loss"].shape[0]),
        "initial_val_loss": float(val[0]), "final_val_loss": float(val[-1]),
        "best_val_loss": best, "unigram_loss": unigram,
        "escaped_plateau": bool(best < unigram - PLATEAU_MARGIN),
        "diverged": diverged_at is not None, "diverged_at": diverged_at,
        "diverge_reason": reason, "nonfinite_steps": int((m["finite"] == 0).sum()),
        "num_spikes": count_spikes(m["loss"], m["grad_norm"], m["finite"]),
        "max_grad_norm": float(np.nanmax(m["grad_norm"])) if np.isfinite(m["grad_norm"]).any()
        else math.nan,
        # Corpus BLEU of the final parameters' greedy translations (None: not scored).
        "bleu": round(float(result.final["bleu"][index]), 3) if "bleu" in result.final else None,
        "val_steps": [int(s) for s in result.val_steps],
        "val_loss": val.tolist(),
        # The other validation curves (accuracy; NSP for BERT), e.g. "val_accuracy".
        **{f"val_{k}": np.round(np.asarray(v[index], np.float64), 5).tolist()
           for k, v in result.val.items() if k != "loss"},
        "train_loss": np.round(m["loss"].astype(np.float64), 4).tolist(),
        "grad_norm": [float(f"{g:.4g}") for g in m["grad_norm"]],
    }


def steps_to_target(record: dict, target: float) -> int | None:
    """The first evaluated step whose validation loss is <= target, if any."""
    for step, loss in zip(record["val_steps"], record["val_loss"]):
        if loss is not None and loss <= target:
            return int(step)
    return None
