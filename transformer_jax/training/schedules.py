"""Learning-rate schedules: linear warm-up from 0 to the peak, then a decay.

    warm-up    peak * step / warmup                      for step < warmup
    constant   peak
    linear     peak -> 0 linearly at total_steps
    cosine     peak * 0.5 * (1 + cos(pi * t)),  t = (step - warmup) / (total - warmup)
               (Loshchilov & Hutter 2017, arXiv 1608.03983, without restarts)
    rsqrt      peak * sqrt(warmup / step): the inverse square root of Vaswani et al.
               2017 (arXiv 1706.03762, eq. 3) d^-0.5 * min(step^-0.5, step * warmup^-1.5),
               rescaled so that its maximum (at step = warmup) is `peak_lr`; the same
               as fairseq's `inverse_sqrt` (warmup_init_lr 0), the schedule of Xiong
               et al. 2020 (arXiv 2002.04745). With warmup 0 it is peak / sqrt(max(step, 1)).
    drop       peak, then peak * 0.1 from update `drop_step` on: Xiong et al. 2020's
               schedule for pre-LN without warm-up (their sec. 4.1: IWSLT14, 5e-4
               decayed by 0.1 at the 8th epoch).
`step` counts optimizer updates (0 for the first). Decays stay at 0 after total_steps.

Warm-up convention: step / warmup, so the first update (step 0) has learning rate
0 and the update at step = warmup is the first at the peak; warmup = 0 means the
peak from the first update. This is what BERT's TF code (global_step / warmup),
fairseq (num_updates * lr_step), Hugging Face (`get_linear_schedule_with_warmup`)
and optax (`warmup_*_schedule`) do, so a "warm-up of T steps" means the same here
as in the papers run with them.

`learning_rate_at` is the one implementation: every argument but `decay` may be a
traced array (per-run values inside `jit(vmap(...))`); `make_schedule` is the
validated optax schedule built on it.
"""
from __future__ import annotations

import math
from typing import Callable

import jax.numpy as jnp
import optax

from transformer_jax import validation


def _constant(s, w, total, drop):
    return jnp.ones_like(s)


def _progress(s, w, total):
    """(step - warmup) / (total - warmup), clipped to [0, 1]."""
    return jnp.clip((s - w) / jnp.maximum(total - w, 1.0), 0.0, 1.0)


def _rsqrt(s, w, total, drop):
    w1 = jnp.maximum(w, 1.0)
    return jnp.sqrt(w1 / jnp.maximum(s, w1))


DROP_FACTOR = 0.1   # Xiong et al. 2020, sec. 4.1


def _drop(s, w, total, drop):
    return jnp.where(s < drop, 1.0, DROP_FACTOR)


# name -> multiplier of the peak after warm-up, a function of (step, warmup, total,
# drop_step) as float32 arrays; it is 1 at step = warmup.
SCHEDULES: dict[str, Callable] = {
    "constant": _constant,
    "linear": lambda s, w, total, drop: 1.0 - _progress(s, w, total),
    "cosine": lambda s, w, total, drop: 0.5 * (1.0 + jnp.cos(jnp.pi * _progress(s, w, total))),
    "rsqrt": _rsqrt,
    "drop": _drop,
}
DECAYING = ("linear", "cosine")   # these need total_steps
DROPPING = ("drop",)              # these need drop_step


def warmup_factor(step, warmup_steps):
    """step / warmup_steps below warmup_steps, else 1 (1 from the start when warmup_steps
    is 0); any of them may be traced arrays, broadcast together -> float32."""
    s = jnp.asarray(step, jnp.float32)
    w = jnp.asarray(warmup_steps, jnp.float32)
    return jnp.where(s < w, s / jnp.maximum(w, 1.0), 1.0)


def learning_rate_at(step, peak_lr, warmup_steps, decay: str = "constant", total_steps=None,
                     drop_step=None):
    """Learning rate at update `step` (0 for the first): linear warm-up over
    `warmup_steps` updates, then the decay `decay` (a key of SCHEDULES, static).
    step, peak_lr, warmup_steps, total_steps and drop_step may be traced arrays (float
    or int, broadcast together) -> float32 array. Unvalidated: `make_schedule` checks
    values."""
    if decay not in SCHEDULES:
        raise ValueError(f"schedule={decay!r} is unknown; valid: {', '.join(SCHEDULES)}")
    if decay in DECAYING and total_steps is None:
        raise ValueError(f"total_steps=None, but schedule {decay!r} decays to 0 at total_steps")
    if decay in DROPPING and drop_step is None:
        raise ValueError(f"drop_step=None, but schedule {decay!r} drops the rate at drop_step")
    s = jnp.asarray(step, jnp.float32)
    w = jnp.asarray(warmup_steps, jnp.float32)
    total = jnp.asarray(0.0 if total_steps is None else total_steps, jnp.float32)
    drop = jnp.asarray(0.0 if drop_step is None else drop_step, jnp.float32)
    after = SCHEDULES[decay](s, w, total, drop)
    return jnp.asarray(peak_lr, jnp.float32) * jnp.where(s < w, warmup_factor(s, w), after)


def _check(name, peak_lr, warmup_steps, total_steps, drop_step) -> None:
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
    if name in DROPPING:
        if not validation.is_int(drop_step) or drop_step <= warmup_steps:
            raise ValueError(f"drop_step={drop_step!r} must be an integer greater than "
                             f"warmup_steps={warmup_steps} for schedule {name!r}")


def make_schedule(name: str, peak_lr: float, warmup_steps: int = 0,
                  total_steps: int | None = None, drop_step: int | None = None) -> optax.Schedule:
    """The optax schedule `name` (see module doc): int step (scalar or any shape) ->
    float32 learning rate of the same shape; ValueError names a bad argument."""
    _check(name, peak_lr, warmup_steps, total_steps, drop_step)
    peak = float(peak_lr)
    return lambda count: learning_rate_at(count, peak, warmup_steps, name, total_steps,
                                          drop_step)
