"""Differences between the supported JAX releases (0.7.2, Colab's, to 0.12), in one
place: code elsewhere asks these functions and never reads `jax.__version__`.

Donation on the CPU before JAX 0.8: a jitted train step with its state donated
(`donate_argnums=(0,)`) gives different numbers from the same step without
donation on jaxlib 0.7.2's CPU backend, with plain `optax.adamw` as with this
library's optimizer: gpt-tiny's loss after 20 steps moved from 4.6385 to 4.6400
and its gradient norm from 0.902 to 0.971, and the README's GPT run diverged
(gradient norm 18,092 at step 100, against 0.6 undonated). JAX 0.10.2 and 0.12
give identical numbers either way (tests/test_training.py checks the donated
step against the undonated one). Donation only saves memory, so it is switched
off there; GPUs and TPUs keep it.
"""
from __future__ import annotations

import jax


def _before(version: tuple[int, int]) -> bool:
    return tuple(jax.__version_info__[:2]) < version


def donation_is_exact(backend: str | None = None) -> bool:
    """Whether donating a jitted function's arguments leaves its results unchanged."""
    backend = backend or jax.default_backend()
    return not (backend == "cpu" and _before((0, 8)))


def donate_argnums(*argnums: int, donate: bool = True) -> tuple[int, ...]:
    """`argnums` for `jax.jit` / `jax.pmap`'s `donate_argnums`, or () where donation
    is off (`donate=False`) or not exact on this backend and release."""
    return tuple(argnums) if donate and donation_is_exact() else ()
