"""Position encodings against their defining properties and formulas."""
import math

import jax.numpy as jnp
import numpy as np

from transformer_jax import positional


def test_sinusoidal_matches_formula():
    table = np.asarray(positional.sinusoidal_table(7, 6))
    for p in range(7):
        for i in range(3):
            angle = p / 10000 ** (2 * i / 6)
            assert math.isclose(table[p, 2 * i], math.sin(angle), abs_tol=1e-5)
            assert math.isclose(table[p, 2 * i + 1], math.cos(angle), abs_tol=1e-5)


def test_rope_scores_depend_only_on_relative_offset():
    r = np.random.RandomState(0)
    q = r.randn(1, 1, 8).astype(np.float32)
    k = r.randn(1, 1, 8).astype(np.float32)

    def score(m, n):
        qm = positional.apply_rope(jnp.asarray(q)[None], jnp.array([m]))
        kn = positional.apply_rope(jnp.asarray(k)[None], jnp.array([n]))
        return float((qm * kn).sum())

    assert math.isclose(score(3, 1), score(12, 10), rel_tol=1e-4)
    assert not math.isclose(score(3, 1), score(3, 2), rel_tol=1e-3)
    # rotation preserves norms
    rot = positional.apply_rope(jnp.asarray(q)[None], jnp.array([5]))
    assert math.isclose(float(jnp.linalg.norm(rot)), float(np.linalg.norm(q)), rel_tol=1e-5)


def test_alibi_slopes_match_paper():
    # Press et al. 2021: 8 heads -> 1/2, 1/4, ..., 1/256.
    np.testing.assert_allclose(positional.alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)])
    s12 = np.asarray(positional.alibi_slopes(12))
    assert len(s12) == 12 and np.all(s12 > 0) and len(set(s12.round(8))) == 12
    bias = np.asarray(positional.alibi_bias(8, jnp.arange(4), jnp.arange(4), causal=True))
    assert bias.shape == (8, 4, 4)
    assert math.isclose(bias[0, 3, 1], -0.5 * 2)
