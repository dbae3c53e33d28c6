"""Host-side divergence detection and a loss-spike counter.

A run has diverged when a step's loss or gradient norm is not finite (the step
itself then skips its update, see `step.apply_grads`). A loss spike is a finite
loss more than `spike_nats` above the median of the last `window` finite losses,
the instability that precedes divergence in post-LN transformers (Liu et al. 2020,
arXiv 2004.08249) and large-model runs (Chowdhery et al. 2022, arXiv 2204.02311,
sec. 5.1); spikes are counted, not fatal, and consecutive spike steps count as one.

The threshold is additive, in nats: a jump of d nats means the batch became e^d
times less likely, whatever the loss level. A ratio to the median (the earlier
definition, 2x) needs a far larger jump early in training: at a loss of 5 nats a
spike must reach 10, worse than uniform guessing over a 384-token vocabulary
(5.95), so the README's GPT run, whose loss jumped from 4.9 to 9.3 at the end of
warm-up, reported none. The window is short (20) so the median follows the fast
early descent instead of lagging behind it.

The definition is implemented once, in `spike_flags` (a pure function of a loss
sequence) and `_is_spike` (one step of it): `DivergenceMonitor` applies the same
rule step by step, and offline analyses (experiments/ln's report) call
`count_spikes` on a finished run's losses.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import statistics
from typing import Any, Mapping


# 1 nat: the batch became e = 2.7 times less likely than the recent typical batch.
# Batch-to-batch noise is far smaller: in the LN benchmark's quick runs (32 runs of
# 300-600 steps, batch 32, experiments/results/quick/runs.jsonl) the training loss
# sits 0.12 nats (std) around its running median, at most 0.70 above it, so noise
# never counts, while the jumps that precede divergence (4.4 nats in the README GPT
# run) do. Shorter histories than MIN_HISTORY have no reliable median.
SPIKE_NATS, SPIKE_WINDOW, MIN_HISTORY = 1.0, 20, 10


def _check_spike_settings(spike_nats: float, window: int, min_history: int) -> None:
    if not spike_nats > 0.0:
        raise ValueError(f"spike_nats={spike_nats!r} must be > 0")
    if window < 1 or not 1 <= min_history <= window:
        raise ValueError(f"window={window!r} and min_history={min_history!r} must satisfy "
                         "1 <= min_history <= window")


def _is_spike(loss: float, history, spike_nats: float, min_history: int) -> tuple[bool, float]:
    """(whether finite `loss` is a spike after the finite losses `history`, their median)."""
    if len(history) < min_history:
        return False, math.nan
    median = statistics.median(history)
    return loss > median + spike_nats, median


def spike_flags(losses, spike_nats: float = SPIKE_NATS, window: int = SPIKE_WINDOW,
                min_history: int = MIN_HISTORY) -> list[bool]:
    """Per step of `losses`, whether it is a spike: a finite loss more than
    `spike_nats` above the median of the previous `window` finite losses (once there
    are `min_history` of them). A non-finite loss (give NaN for a step that diverged
    for another reason, e.g. a non-finite gradient) is no spike and no history."""
    _check_spike_settings(spike_nats, window, min_history)
    history: collections.deque[float] = collections.deque(maxlen=window)
    flags = []
    for loss in map(float, losses):
        finite = math.isfinite(loss)
        flags.append(finite and _is_spike(loss, history, spike_nats, min_history)[0])
        if finite:
            history.append(loss)
    return flags


def count_spikes(losses, spike_nats: float = SPIKE_NATS, window: int = SPIKE_WINDOW,
                 min_history: int = MIN_HISTORY) -> int:
    """Spike events in `losses` (see `spike_flags`): consecutive spike steps, also with
    non-finite steps between them, are one event."""
    events, in_spike = 0, False
    for loss, spike in zip(losses, spike_flags(losses, spike_nats, window, min_history)):
        if math.isfinite(float(loss)):
            events += spike and not in_spike
            in_spike = spike
    return events


def _value(metrics: Mapping[str, Any], key: str, default: float = 0.0) -> float:
    return float(metrics[key]) if key in metrics else default


def is_diverged(metrics: Mapping[str, Any]) -> bool:
    """True if the step's loss or gradient norm (scalars; host or device) is not
    finite, or it reports finite=0."""
    values = [_value(metrics, k) for k in ("loss", "grad_norm") if k in metrics]
    return not all(map(math.isfinite, values)) or _value(metrics, "finite", 1.0) == 0.0


@dataclasses.dataclass(frozen=True)
class DivergenceStatus:
    """What `DivergenceMonitor.update` concluded about one step."""
    diverged: bool              # this step's loss or gradient norm is not finite
    spike: bool                 # this step's loss is a spike
    num_spikes: int             # spikes so far
    diverged_at: int | None     # the first step that diverged, if any
    reason: str = ""


class DivergenceMonitor:
    """Call `update(step, metrics)` after every step (metrics: scalar "loss",
    "grad_norm", "finite"; host floats or device arrays `[]`)."""

    def __init__(self, spike_nats: float = SPIKE_NATS, window: int = SPIKE_WINDOW,
                 min_history: int = MIN_HISTORY):
        _check_spike_settings(spike_nats, window, min_history)
        self.spike_nats, self.min_history = spike_nats, min_history
        self._in_spike = False   # the previous step was a spike: same event
        self.losses: collections.deque[float] = collections.deque(maxlen=window)
        self.num_spikes = 0
        self.diverged_at: int | None = None

    def update(self, step: int, metrics: Mapping[str, Any]) -> DivergenceStatus:
        """Record one step's scalar metrics; flags divergence and counts spikes."""
        loss = _value(metrics, "loss", math.nan)
        if is_diverged(metrics):
            if self.diverged_at is None:
                self.diverged_at = int(step)
            reason = (f"step {step}: loss={loss}, grad_norm={_value(metrics, 'grad_norm', math.nan)} "
                      "is not finite; the update was skipped")
            return DivergenceStatus(True, False, self.num_spikes, self.diverged_at, reason)
        spike, median = _is_spike(loss, self.losses, self.spike_nats, self.min_history)
        reason = (f"step {step}: loss {loss:.4g} > running median {median:.4g} + "
                  f"{self.spike_nats} nats") if spike else ""
        self.num_spikes += spike and not self._in_spike
        self._in_spike = spike
        self.losses.append(loss)
        return DivergenceStatus(False, spike, self.num_spikes, self.diverged_at, reason)

    def state_dict(self) -> dict:
        """JSON-ready state, for the checkpoint's metadata."""
        return {"losses": list(self.losses), "num_spikes": self.num_spikes,
                "diverged_at": self.diverged_at, "in_spike": self._in_spike}

    def load_state_dict(self, state: Mapping[str, Any]) -> "DivergenceMonitor":
        """Inverse of `state_dict` (a resumed run keeps its loss history)."""
        self.losses.clear()
        self.losses.extend(float(x) for x in state["losses"])
        self.num_spikes, self.diverged_at = int(state["num_spikes"]), state["diverged_at"]
        self._in_spike = bool(state.get("in_spike", False))
        return self
