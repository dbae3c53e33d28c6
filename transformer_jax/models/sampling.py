"""Next-token selection as pure functions of logits `[..., vocab]`."""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = jnp.finfo(jnp.float32).min


def top_k_filter(logits, k: int):
    """Keeps the k largest logits per row (ties at the threshold kept): `[..., vocab]`
    -> `[..., vocab]`, the others set to finfo(float32).min."""
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, NEG, logits)


def top_p_filter(logits, p):
    """Nucleus filtering (Holtzman et al. 2019, arXiv 1904.09751): keeps the smallest
    set of tokens whose probability mass reaches p; the top token always survives.
    `[..., vocab]` -> `[..., vocab]`, the others set to finfo(float32).min."""
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < p
    # Threshold = the smallest kept logit.
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, NEG, logits)


def select(logits, rng, *, greedy: bool, temperature=1.0, top_k: int | None = None, top_p=None):
    """One token id per row of `logits [..., vocab]` -> int `[...]`: argmax when
    `greedy`, else a draw from softmax(logits / temperature) after the filters."""
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return jax.random.categorical(rng, logits, axis=-1)
