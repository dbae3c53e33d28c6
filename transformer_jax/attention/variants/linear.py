"""`linear`: kernelized attention with the feature map phi(x) = elu(x) + 1
(Katharopoulos et al. 2020, "Transformers are RNNs", arXiv 2006.16236):

    out_i = phi(q_i)^T S / phi(q_i)^T z,  S = sum_j phi(k_j) v_j^T,  z = sum_j phi(k_j)

(their eq. 5-6), so time and memory are O(n m d) for m features instead of
O(n^2). Causal mode restricts both sums to j <= i (eq. 8-9). The prefix sums
are taken chunk by chunk: inside a chunk of `linear_chunk` tokens the masked
quadratic form, between chunks an exclusive cumulative sum of chunk states,
so the state tensor is `[n / chunk, m, d]` rather than `[n, m, d]`.
`linear_attention_recurrent_step` is the same computation as an RNN with an
O(1) state (S, z), for generation (their Sec. 3.4).

`kernelized_attention` is shared with `performer`, which only changes phi.
Padded keys get phi(k) = 0, which removes them from both sums exactly.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from transformer_jax.attention import functional
from transformer_jax.attention.registry import AttentionVariant, register
from transformer_jax.attention.variants import blocks, common

NAME = "linear"


def elu_feature_map(x):
    """phi(x) = elu(x) + 1 > 0, elementwise in float32 (Katharopoulos et al. 2020,
    eq. 7): `[..., d]` -> `[..., d]`."""
    return jax.nn.elu(x.astype(jnp.float32)) + 1.0


def _exclusive_cumsum(x, axis: int):
    """Sum of the chunks strictly before each chunk (shift, then cumsum: no cancellation)."""
    x = jnp.cumsum(x, axis=axis)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (1, 0)
    return jax.lax.slice_in_dim(jnp.pad(x, pad), 0, x.shape[axis], axis=axis)


def _causal_sums(fq, fk, v, chunk: int):
    """Numerator `[B, n, H, d]` and denominator `[B, n, H]` over keys j <= i."""
    n = fq.shape[1]
    c = min(chunk, n)
    fq, fk, v = (blocks.to_blocks(x, c, axis=1) for x in (fq, fk, v))  # [B, nc, c, H, .]
    a = jnp.einsum("bnqhm,bnkhm->bnhqk", fq, fk) * jnp.tril(jnp.ones((c, c), jnp.float32))
    num = jnp.einsum("bnhqk,bnkhd->bnqhd", a, v)
    den = jnp.swapaxes(a.sum(axis=-1), 2, 3)  # [B, nc, c, H]
    states = _exclusive_cumsum(jnp.einsum("bnkhm,bnkhd->bnhmd", fk, v), axis=1)
    norms = _exclusive_cumsum(fk.sum(axis=2), axis=1)  # [B, nc, H, m]
    num = num + jnp.einsum("bnqhm,bnhmd->bnqhd", fq, states)
    den = den + jnp.einsum("bnqhm,bnhm->bnqh", fq, norms)
    flat = lambda x: x.reshape(x.shape[0], -1, *x.shape[3:])[:, :n]
    return flat(num), flat(den)


def kernelized_attention(fq, fk, v, *, valid_k=None, causal: bool = False, chunk: int = 64):
    """phi(q) `[B, n, H, m]`, phi(k) `[B, s, H, m]` (positive), v `[B, s, H, d]`, key
    validity `[B|1, H|1, s]` -> float32 `[B, n, H, d]`; a row with no valid key gives 0."""
    if valid_k is not None:
        # where, not a product: 0 * inf (an overflowed feature of a padded key) is NaN
        fk = jnp.where(jnp.swapaxes(valid_k, 1, 2)[..., None], fk, 0.0)
    v = v.astype(jnp.float32)
    if causal:
        if fq.shape[1] != fk.shape[1]:
            raise ValueError(f"causal linear attention needs q_len == kv_len, got "
                             f"{fq.shape[1]} and {fk.shape[1]}")
        num, den = _causal_sums(fq, fk, v, chunk)
    else:
        s = jnp.einsum("bshm,bshd->bhmd", fk, v)
        num = jnp.einsum("bqhm,bhmd->bqhd", fq, s)
        den = jnp.einsum("bqhm,bhm->bqh", fq, fk.sum(axis=1))
    return common.safe_divide(num, den[..., None])


def linear_attention(q, k, v, *, mask=None, causal: bool = False, chunk: int = 64):
    """q `[..., n, heads, d]`, k/v `[..., s, kv_heads, d]`, key-only mask `[..., 1, s]`
    -> `[..., n, heads, d]`."""
    common.check_arg(NAME, "chunk", chunk)
    functional.check_mask_and_bias(q, k, mask, kind=NAME, key_only=True)
    batch = common.batch_shape(q, k)
    valid_k = common.key_valid(mask, batch, NAME)
    q, k, v, batch = common.flatten_qkv(q, k, v)
    out = kernelized_attention(elu_feature_map(q), elu_feature_map(k), v, valid_k=valid_k,
                               causal=causal, chunk=chunk)
    return common.unflatten(out.astype(q.dtype), batch)


def linear_attention_init_state(batch_shape, heads: int, features: int, value_dim: int):
    """Empty recurrent state: S `[..., heads, features, value_dim]`, z `[..., heads, features]`."""
    return (jnp.zeros((*batch_shape, heads, features, value_dim), jnp.float32),
            jnp.zeros((*batch_shape, heads, features), jnp.float32))


def linear_attention_recurrent_step(state, q_t, k_t, v_t, feature_map=elu_feature_map):
    """One generation step of causal linear attention (Katharopoulos et al. 2020, eq. 18-20).

    state (S `[..., H, m, d]`, z `[..., H, m]`); q_t `[..., H, d]`, k_t/v_t `[..., Hk, d]`
    (H % Hk == 0). Returns the new state and out_t `[..., H, d]` in q_t's dtype; feeding
    tokens one by one reproduces `linear_attention(..., causal=True)`."""
    groups = q_t.shape[-2] // k_t.shape[-2]
    if groups > 1:
        k_t, v_t = jnp.repeat(k_t, groups, axis=-2), jnp.repeat(v_t, groups, axis=-2)
    s, z = state
    fk = feature_map(k_t)
    s = s + fk[..., :, None] * v_t.astype(jnp.float32)[..., None, :]
    z = z + fk
    fq = feature_map(q_t)
    num = jnp.einsum("...hm,...hmd->...hd", fq, s)
    den = jnp.einsum("...hm,...hm->...h", fq, z)
    return (s, z), common.safe_divide(num, den[..., None]).astype(q_t.dtype)


def _fn(q, k, v, *, mask, bias, causal, config, extra, dropout_rate, dropout_rng, deterministic):
    del bias, extra, dropout_rng
    if dropout_rate and not deterministic:
        common.reject(NAME, attention_dropout=dropout_rate,
                      why="it never forms attention probabilities to drop")
    return linear_attention(q, k, v, mask=mask, causal=causal, chunk=config.linear_chunk)


def _validate(config, *, causal, position, attention_dropout):
    del causal
    common.check_positive(NAME, "linear_chunk", config.linear_chunk)
    common.reject(NAME, position=position, attention_dropout=attention_dropout,
                  why="it never forms the n x n scores that a bias or dropout would act on")


register(AttentionVariant(NAME, _fn, validate=_validate, full_mask=False, supports_bias=False,
                          supports_decode=False, supports_weights=False))
