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

W is drawn with numpy from `random_seed` and the attention module's place in the
model (encoder / decoder, self / cross) at trace time: a fixed constant, not a
parameter (the optimiser must not train it). The layer index is left out of the
seed, so the layers of a stack share one draw: `nn.scan` runs one module for
every layer and could not give each its own, and `scan_layers` must compute the
same function as the unrolled stack. The paper redraws W periodically during
training; a fixed draw is the simpler choice and works at our scales.

exp() is shifted by stabilisers that cancel in the ratio num / den (as the
authors' code, which also adds FEATURE_EPS to every feature). Bidirectional
attention shifts every key by the maximum over all valid keys. Causal attention
may not: with FEATURE_EPS the shift does not cancel exactly, so a maximum that
sees future keys lets them change past outputs. There each query i uses the
running maximum M_i over keys j <= i, and the sums over j <= i are taken in the
scale of M_i (rescaled as in online softmax), so output i depends on keys
j <= i only. The non-causal algebra and padding are shared with `linear`.
"""
from __future__ import annotations

import math
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.attention import functional
from transformer_jax.attention.registry import AttentionVariant, register
from transformer_jax.attention.variants import blocks, common
from transformer_jax.attention.variants.linear import kernelized_attention
from transformer_jax.scan_names import SCAN_BLOCK, SCAN_NAME

NAME = "performer"
# Added to every feature as in the authors' implementation (google-research
# performer/fast_attention, numerical_stabilizer=1e-6): keeps phi(q)^T sum phi(k)
# away from 0 when all features of a row underflow.
FEATURE_EPS = 1e-6
_LAYER = re.compile(r"layer_\d+")   # how an unrolled stack names its layers (stacks.py)


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


def _scaled(x, w):
    """x `[B, n, H, d]` -> the exponent w x' - |x'|^2 / 2 `[B, n, H, m]` of phi(x'),
    x' = x / d^(1/4), in float32."""
    x = x.astype(jnp.float32) * x.shape[-1] ** -0.25
    proj = jnp.einsum("bnhd,md->bnhm", x, w)
    return proj - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)


def favor_features(x, w, *, is_query: bool, valid=None):
    """x `[B, n, H, d]`, w `[m, d]` -> positive features `[B, n, H, m]` (float32).

    exp() is shifted by a stabiliser that cancels in the ratio num / den: the row
    maximum for queries, the maximum over all (valid) keys for keys (as the authors'
    code; bidirectional attention only, see the module docstring). It carries no
    gradient because the output does not depend on it."""
    logits = _scaled(x, w)
    if is_query:
        stab = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
        return (jnp.exp(logits - stab) + FEATURE_EPS) / math.sqrt(w.shape[0])
    keep = True if valid is None else jnp.swapaxes(valid, 1, 2)[..., None]
    stab = jax.lax.stop_gradient(jnp.where(keep, logits, common.NEG).max(axis=(1, 3),
                                                                          keepdims=True))
    # Padded keys masked before exp: whatever they hold, exp is 0, never inf (a padded
    # logit above every real one; a sequence with no real key, where stab is NEG).
    return (jnp.exp(jnp.where(keep, logits - stab, common.NEG)) + FEATURE_EPS) \
        / math.sqrt(w.shape[0])


def _running_max(logits, valid):
    """M_j = max over valid keys j' <= j and features of the key exponents `[B, s, H, m]`
    -> `[B, s, H]` (NEG before the first valid key), without gradient."""
    top = logits.max(axis=-1)
    if valid is not None:
        top = jnp.where(jnp.swapaxes(valid, 1, 2), top, common.NEG)
    return jax.lax.stop_gradient(jax.lax.cummax(top, axis=1))


def _combine(a, b):
    """Sums of chunk states in the scale of the larger running maximum (associative)."""
    (ma, sa, za), (mb, sb, zb) = a, b
    m = jnp.maximum(ma, mb)
    fa, fb = jnp.exp(ma - m), jnp.exp(mb - m)
    return m, sa * fa[..., None, None] + sb * fb[..., None, None], za * fa[..., None] + zb * fb[..., None]


def causal_favor_attention(fq, logits_k, v, *, valid_k=None, chunk: int = 64):
    """Causal FAVOR+: phi(q) `[B, n, H, m]`, key exponents `[B, n, H, m]` (`_scaled`),
    v `[B, n, H, d]`, key validity `[B|1, H|1, n]` -> float32 `[B, n, H, d]`.

    Query i weighs valid key j <= i by phi(q_i) . (exp(logits_j - M_i) + FEATURE_EPS)
    with M_i the running maximum (`_running_max`): chunk by chunk, the masked
    quadratic form inside a chunk and rescaled prefix sums of chunk states between
    chunks; FEATURE_EPS's share is a prefix sum of the valid values."""
    n = fq.shape[1]
    valid = (jnp.ones((1, 1, n), bool) if valid_k is None else valid_k)
    valid_t = jnp.broadcast_to(jnp.swapaxes(valid, 1, 2), v.shape[:3])      # [B, n, H]
    run_max = _running_max(logits_k, valid_k)                                # [B, n, H]
    # exp(logits_j - M_j) <= 1; `where` before exp keeps padded keys at exactly 0.
    ek = jnp.exp(jnp.where(valid_t[..., None], logits_k - run_max[..., None], common.NEG))
    v = v.astype(jnp.float32)
    c = min(chunk, n)
    fqb, ekb, vb = (blocks.to_blocks(x, c, axis=1) for x in (fq, ek, v))  # [B, nc, c, H, .]
    mb = blocks.to_blocks(run_max, c, axis=1, value=common.NEG)             # [B, nc, c, H]
    mb = jax.lax.cummax(mb, axis=2)   # already non-decreasing; the padded tail keeps the max
    mq, mk = jnp.swapaxes(mb, 2, 3)[..., :, None], jnp.swapaxes(mb, 2, 3)[..., None, :]
    tril = jnp.tril(jnp.ones((c, c), bool))
    scale = jnp.exp(jnp.where(tril, mk - mq, common.NEG))                   # [B, nc, H, q, k]
    a = jnp.einsum("bnqhm,bnkhm->bnhqk", fqb, ekb) * scale
    num = jnp.einsum("bnhqk,bnkhd->bnqhd", a, vb)
    den = jnp.swapaxes(a.sum(axis=-1), 2, 3)                                # [B, nc, c, H]
    # Each chunk's state in the scale of its last running maximum, then prefix sums
    # over the chunks before (exclusive), rescaled to each query's M_i.
    last = mb[:, :, -1]                                                     # [B, nc, H]
    to_last = jnp.exp(mb - last[:, :, None])[..., None]
    states = jnp.einsum("bnkhm,bnkhd->bnhmd", ekb * to_last, vb)
    norms = (ekb * to_last).sum(axis=2)                                     # [B, nc, H, m]
    m_in, s_in, z_in = jax.lax.associative_scan(_combine, (last, states, norms), axis=1)
    shift = lambda x, fill: jnp.concatenate([jnp.full_like(x[:, :1], fill), x[:, :-1]], axis=1)
    m_prev, s_prev, z_prev = shift(m_in, common.NEG), shift(s_in, 0.0), shift(z_in, 0.0)
    back = jnp.exp(m_prev[:, :, None] - mb)[..., None]                      # [B, nc, c, H, 1]
    num = num + jnp.einsum("bnqhm,bnhmd->bnqhd", fqb * back, s_prev)
    den = den + jnp.einsum("bnqhm,bnhm->bnqh", fqb * back, z_prev)
    flat = lambda x: x.reshape(x.shape[0], -1, *x.shape[3:])[:, :n]
    mass = fq.sum(axis=-1)                                                  # [B, n, H]
    counted = valid_t.astype(jnp.float32)
    num = flat(num) + FEATURE_EPS * mass[..., None] * jnp.cumsum(counted[..., None] * v, axis=1)
    den = flat(den) + FEATURE_EPS * mass * jnp.cumsum(counted, axis=1)
    return common.safe_divide(num, den[..., None])


def performer_attention(q, k, v, w, *, mask=None, causal: bool = False, chunk: int = 64):
    """q `[..., n, heads, d]`, k/v `[..., s, kv_heads, d]`, key-only mask `[..., 1, s]`,
    w `[m, d]` -> `[..., n, heads, d]`, an unbiased estimate of softmax attention."""
    common.check_arg(NAME, "chunk", chunk)
    functional.check_mask_and_bias(q, k, mask, kind=NAME, key_only=True)
    batch = common.batch_shape(q, k)
    valid_k = common.key_valid(mask, batch, NAME)
    q, k, v, batch = common.flatten_qkv(q, k, v)
    fq = favor_features(q, w, is_query=True)
    if causal:
        if q.shape[1] != k.shape[1]:
            raise ValueError(f"causal performer attention needs q_len == kv_len, got "
                             f"{q.shape[1]} and {k.shape[1]}")
        out = causal_favor_attention(fq, _scaled(k, w), v, valid_k=valid_k, chunk=chunk)
    else:
        fk = favor_features(k, w, is_query=False, valid=valid_k)
        out = kernelized_attention(fq, fk, v, valid_k=valid_k, chunk=chunk)
    return common.unflatten(out.astype(q.dtype), batch)


def _make_extra(module, config, *, q_len, kv_len, num_heads, num_kv_heads, head_dim):
    del q_len, kv_len, num_heads, num_kv_heads
    # One draw per attention site, shared by the layers of a stack (module
    # docstring): the module's path without its layer (crc32 is stable across
    # processes, unlike hash()).
    path = "/".join(str(p) for p in getattr(module, "path", ())
                    if not _LAYER.fullmatch(str(p)) and str(p) not in (SCAN_NAME, SCAN_BLOCK))
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
