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
"""
from __future__ import annotations

import collections
import dataclasses
import math
import statistics
from typing import Any, Mapping


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

    def __init__(self, spike_nats: float = 1.0, window: int = 20, min_history: int = 10):
        if not spike_nats > 0.0:
            raise ValueError(f"spike_nats={spike_nats!r} must be > 0")
        if window < 1 or not 1 <= min_history <= window:
            raise ValueError(f"window={window!r} and min_history={min_history!r} must satisfy "
                             "1 <= min_history <= window")
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
        spike, reason = False, ""
        if len(self.losses) >= self.min_history:
            median = statistics.median(self.losses)
            if loss > median + self.spike_nats:
                spike, reason = True, (f"step {step}: loss {loss:.4g} > running median "
                                       f"{median:.4g} + {self.spike_nats} nats")
                self.num_spikes += not self._in_spike
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
