"""Learning-rate schedules: linear warm-up from 0 to the peak, then a decay.

    constant   peak
    linear     peak -> 0 linearly at total_steps
    cosine     peak * 0.5 * (1 + cos(pi * t)),  t = (step - warmup) / (total - warmup)
               (Loshchilov & Hutter 2017, arXiv 1608.03983, without restarts)
    rsqrt      peak * sqrt(warmup / step): Vaswani et al. 2017 (arXiv 1706.03762,
               eq. 3) d^-0.5 * min(step^-0.5, step * warmup^-1.5), rescaled so that
               its maximum (at step = warmup) is `peak_lr`. With warmup 0 it is
               peak / sqrt(max(step, 1)).
`step` counts optimizer updates (0 for the first). Decays stay at 0 after total_steps.
"""
from __future__ import annotations

import math
from typing import Callable

import jax.numpy as jnp
import optax


def _rsqrt(peak_lr: float, warmup_steps: int) -> optax.Schedule:
    # Called with steps counted from the end of warm-up (optax.join_schedules).
    offset = max(warmup_steps, 1)
    return lambda count: peak_lr * jnp.sqrt(offset / jnp.maximum(count + warmup_steps, offset))


SCHEDULES: dict[str, Callable[[float, int, int], optax.Schedule]] = {
    "constant": lambda peak, warmup, total: optax.constant_schedule(peak),
    "linear": lambda peak, warmup, total: optax.linear_schedule(peak, 0.0, total - warmup),
    "cosine": lambda peak, warmup, total: optax.cosine_decay_schedule(peak, total - warmup),
    "rsqrt": lambda peak, warmup, total: _rsqrt(peak, warmup),
}
DECAYING = ("linear", "cosine")


def _check(name, peak_lr, warmup_steps, total_steps) -> None:
    if name not in SCHEDULES:
        raise ValueError(f"schedule={name!r} is unknown; valid: {', '.join(SCHEDULES)}")
    if not isinstance(peak_lr, (int, float)) or not math.isfinite(peak_lr) or peak_lr <= 0:
        raise ValueError(f"peak_lr={peak_lr!r} must be a finite positive number")
    if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps!r} must be a non-negative integer")
    if name in DECAYING:
        if not isinstance(total_steps, int) or isinstance(total_steps, bool) \
                or total_steps <= warmup_steps:
            raise ValueError(f"total_steps={total_steps!r} must be an integer greater than "
                             f"warmup_steps={warmup_steps} for schedule {name!r}")


def make_schedule(name: str, peak_lr: float, warmup_steps: int = 0,
                  total_steps: int | None = None) -> optax.Schedule:
    """The optax schedule `name` (see module doc): int step (scalar or any shape) ->
    float32 learning rate of the same shape; ValueError names a bad argument."""
    _check(name, peak_lr, warmup_steps, total_steps)
    after = SCHEDULES[name](float(peak_lr), warmup_steps, total_steps)
    if warmup_steps == 0:
        return after
    # peak * step / warmup rather than optax.linear_schedule, whose (init - end) *
    # (1 - t) + end form loses float32 precision at small steps.
    warmup = lambda count: float(peak_lr) * jnp.asarray(count, jnp.float32) / warmup_steps
    return optax.join_schedules([warmup, after], [warmup_steps])
