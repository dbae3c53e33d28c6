"""The one warm-up (`learning_rate_at`) against a closed form, with per-run values
traced through `jit(vmap(...))` as the LN-stability sweep uses it."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.training.schedules import SCHEDULES, learning_rate_at, make_schedule, warmup_factor

STEPS = np.array([0, 1, 2, 3, 7, 9, 10, 11, 50, 99, 100, 101, 400, 1000, 4499, 4500, 4510])


DROP = 4500   # drop_step of "drop": after every warm-up of RUNS


def closed_form(name, peak, warmup, total, s):
    """Linear warm-up peak * s / warmup (first update at 0), then the decay."""
    if s < warmup:
        return peak * s / warmup
    t = min(max(s - warmup, 0) / max(total - warmup, 1), 1.0)
    return {"constant": peak, "linear": peak * (1 - t),
            "cosine": peak * 0.5 * (1 + math.cos(math.pi * t)),
            # fairseq inverse_sqrt: peak * sqrt(warmup) / sqrt(num_updates) after warm-up
            "rsqrt": peak * math.sqrt(max(warmup, 1)) / math.sqrt(max(s, warmup, 1)),
            # Xiong et al. 2020 sec. 4.1: x0.1 from the drop on
            "drop": peak * (0.1 if s >= DROP else 1.0)}[name]


RUNS = [(1e-3, 0), (5e-4, 1), (1e-3, 10), (3e-4, 100), (2.0, 4000)]  # (peak, warmup)


@pytest.mark.parametrize("name", SCHEDULES)   # a new schedule needs its closed form above
def test_traced_vmapped_per_run_values_match_closed_form(name):
    total = 5000
    peaks = jnp.array([p for p, _ in RUNS], jnp.float32)
    warmups = jnp.array([w for _, w in RUNS], jnp.float32)
    per_run = jax.jit(jax.vmap(lambda p, w: learning_rate_at(jnp.asarray(STEPS), p, w, name, total,
                                                             DROP)))
    got = np.asarray(per_run(peaks, warmups))
    want = np.array([[closed_form(name, p, w, total, s) for s in STEPS] for p, w in RUNS])
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-12)
    # The step may be traced too, as in a scanned training loop.
    by_step = jax.jit(jax.vmap(lambda s: learning_rate_at(s, peaks, warmups, name, total, DROP)))
    np.testing.assert_allclose(np.asarray(by_step(jnp.asarray(STEPS))).T, want, rtol=2e-6,
                               atol=1e-12)


@pytest.mark.parametrize("name", ["constant", "linear", "rsqrt", "drop"])
@pytest.mark.parametrize("peak, warmup", RUNS)
def test_make_schedule_is_the_same_function(name, peak, warmup):
    total = 5000
    fn = make_schedule(name, peak, warmup, total, DROP if name == "drop" else None)
    want = [closed_form(name, peak, warmup, total, s) for s in STEPS]
    np.testing.assert_allclose(np.asarray(fn(jnp.asarray(STEPS))), want, rtol=2e-6, atol=1e-12)


def test_warmup_convention():
    # First update at 0, the peak first reached at step = warmup; no warm-up: peak at once.
    assert float(warmup_factor(0, 4)) == 0.0 and float(warmup_factor(3, 4)) == 0.75
    assert float(warmup_factor(4, 4)) == 1.0 and float(warmup_factor(0, 0)) == 1.0
    assert float(learning_rate_at(0, 1e-3, 0)) == pytest.approx(1e-3)


def test_bad_decay_is_named():
    with pytest.raises(ValueError, match="schedule='warm'"):
        learning_rate_at(0, 1e-3, 10, "warm")
    with pytest.raises(ValueError, match="total_steps"):
        learning_rate_at(0, 1e-3, 10, "linear")
    with pytest.raises(ValueError, match="drop_step=None"):
        learning_rate_at(0, 1e-3, 10, "drop")
    for bad in (None, 10, 5, 2.5, True):   # must come after the warm-up of 10
        with pytest.raises(ValueError, match=f"drop_step={bad!r} must be an integer greater"):
            make_schedule("drop", 1e-3, 10, None, bad)
