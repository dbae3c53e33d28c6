"""Host-side divergence detection and a loss-spike counter.

A run has diverged when a step's loss or gradient norm is not finite (the step
itself then skips its update, see `step.apply_grads`). A loss spike is a finite
loss above `spike_factor` times the median of the last `window` finite losses,
the instability that precedes divergence in post-LN transformers (Liu et al. 2020,
arXiv 2004.08249) and large-model runs (Chowdhery et al. 2022, arXiv 2204.02311,
sec. 5.1); spikes are counted, not fatal.
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

    def __init__(self, spike_factor: float = 2.0, window: int = 100, min_history: int = 10):
        if not spike_factor > 1.0:
            raise ValueError(f"spike_factor={spike_factor!r} must be > 1")
        if window < 1 or not 1 <= min_history <= window:
            raise ValueError(f"window={window!r} and min_history={min_history!r} must satisfy "
                             "1 <= min_history <= window")
        self.spike_factor, self.min_history = spike_factor, min_history
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
            if loss > self.spike_factor * median:
                spike, reason = True, (f"step {step}: loss {loss:.4g} > {self.spike_factor} x "
                                       f"running median {median:.4g}")
                self.num_spikes += 1
        self.losses.append(loss)
        return DivergenceStatus(False, spike, self.num_spikes, self.diverged_at, reason)

    def state_dict(self) -> dict:
        """JSON-ready state, for the checkpoint's metadata."""
        return {"losses": list(self.losses), "num_spikes": self.num_spikes,
                "diverged_at": self.diverged_at}

    def load_state_dict(self, state: Mapping[str, Any]) -> "DivergenceMonitor":
        """Inverse of `state_dict` (a resumed run keeps its loss history)."""
        self.losses.clear()
        self.losses.extend(float(x) for x in state["losses"])
        self.num_spikes, self.diverged_at = int(state["num_spikes"]), state["diverged_at"]
        return self
