"""`performer`: FAVOR+ (Choromanski et al. 2020, "Rethinking Attention with
Performers", arXiv 2009.14794). Softmax attention is approximated with the
positive random features of their Lemma 1,

    phi(x) = exp(W x - |x|^2 / 2) / sqrt(m),  E[phi(q)^T phi(k)] = exp(q^T k),

applied to x = q / d^(1/4) and k / d^(1/4) so that exp(q'^T k') is the softmax
kernel exp(q^T k / sqrt(d)). The m rows of W are orthogonal (Sec. 2.4, blocks of
d orthonormal rows from QR of Gaussian matrices) and rescaled to the norms of
Gaussian vectors, which keeps the estimator unbiased and lowers its variance.
The feature count m is `AttentionConfig.num_features`; the error against exact
softmax falls roughly as 1/sqrt(m).

W is drawn with numpy from `random_seed` and the layer's path at trace time: a
fixed constant per layer, not a parameter (the optimiser must not train it).
The paper redraws W periodically during training; a fixed draw is the simpler
choice and works at our scales. The linear-attention algebra, causal prefix
sums and padding are shared with `linear`.
"""
from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.attention import functional
from transformer_jax.attention.registry import AttentionVariant, register
from transformer_jax.attention.variants import common
from transformer_jax.attention.variants.linear import kernelized_attention

NAME = "performer"
# Added to every feature as in the authors' implementation (google-research
# performer/fast_attention, numerical_stabilizer=1e-6): keeps phi(q)^T sum phi(k)
# away from 0 when all features of a row underflow.
FEATURE_EPS = 1e-6


def orthogonal_random_features(num_features: int, head_dim: int, seed: int) -> np.ndarray:
    """`[num_features, head_dim]` projection W: stacked orthonormal blocks with each
    row rescaled to the norm of an independent N(0, I_d) vector."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(-(-num_features // head_dim)):
        q, _ = np.linalg.qr(rng.standard_normal((head_dim, head_dim)))
        rows.append(q.T)
    w = np.concatenate(rows, axis=0)[:num_features]
    norms = np.linalg.norm(rng.standard_normal((num_features, head_dim)), axis=1)
    return (w * norms[:, None]).astype(np.float32)


def favor_features(x, w, *, is_query: bool, valid=None):
    """x `[B, n, H, d]`, w `[m, d]` -> positive features `[B, n, H, m]` (float32).

    exp() is shifted by a stabiliser that cancels in the ratio num / den: the row
    maximum for queries, the maximum over all (valid) keys for keys (as the authors'
    code). It carries no gradient because the output does not depend on it."""
    x = x.astype(jnp.float32) * x.shape[-1] ** -0.25
    proj = jnp.einsum("bnhd,md->bnhm", x, w)
    sq_norm = 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
    if is_query:
        stab = proj.max(axis=-1, keepdims=True)
    else:
        masked = proj if valid is None else jnp.where(jnp.swapaxes(valid, 1, 2)[..., None],
                                                      proj, common.NEG)
        stab = masked.max(axis=(1, 3), keepdims=True)
    stab = jax.lax.stop_gradient(stab)
    return (jnp.exp(proj - sq_norm - stab) + FEATURE_EPS) / math.sqrt(w.shape[0])


def performer_attention(q, k, v, w, *, mask=None, causal: bool = False, chunk: int = 64):
    """q `[..., n, heads, d]`, k/v `[..., s, kv_heads, d]`, key-only mask `[..., 1, s]`,
    w `[m, d]` -> `[..., n, heads, d]`, an unbiased estimate of softmax attention."""
    functional.check_mask_and_bias(q, k, mask, kind=NAME, key_only=True)
    batch = common.batch_shape(q, k)
    valid_k = common.key_valid(mask, batch, NAME)
    q, k, v, batch = common.flatten_qkv(q, k, v)
    fq = favor_features(q, w, is_query=True)
    fk = favor_features(k, w, is_query=False, valid=valid_k)
    out = kernelized_attention(fq, fk, v, valid_k=valid_k, causal=causal, chunk=chunk)
    return common.unflatten(out.astype(q.dtype), batch)


def _make_extra(module, config, *, q_len, kv_len, num_heads, num_kv_heads, head_dim):
    del q_len, kv_len, num_heads, num_kv_heads
    # A different draw per layer: fold the module's path into the seed (crc32 is
    # stable across processes, unlike hash()).
    path = "/".join(str(p) for p in getattr(module, "path", ()))
    seed = (config.random_seed * 1_000_003 + zlib.crc32(path.encode())) % 2**32
    w = orthogonal_random_features(config.num_features, head_dim, seed)
    return {"performer_projection": jnp.asarray(w)}


def _fn(q, k, v, *, mask, bias, causal, config, extra, dropout_rate, dropout_rng, deterministic):
    del bias, dropout_rng
    if dropout_rate and not deterministic:
        common.reject(NAME, attention_dropout=dropout_rate,
                      why="it never forms attention probabilities to drop")
    return performer_attention(q, k, v, extra["performer_projection"], mask=mask, causal=causal,
                               chunk=config.linear_chunk)


def _validate(config, *, causal, position, attention_dropout):
    del causal
    common.check_positive(NAME, "num_features", config.num_features)
    common.check_positive(NAME, "linear_chunk", config.linear_chunk)
    common.reject(NAME, position=position, attention_dropout=attention_dropout,
                  why="it never forms the n x n scores that a bias or dropout would act on")


register(AttentionVariant(NAME, _fn, make_extra=_make_extra, validate=_validate, full_mask=False,
                          supports_bias=False, supports_decode=False, supports_weights=False))
