"""Attention kernels and MultiHeadAttention against the float64 numpy reference."""
import jax
import numpy as np
import pytest
import reference

from transformer_jax.attention import (AttentionConfig, MultiHeadAttention, attention_weights, causal_mask,
                                       combine_masks, dot_product_attention, padding_mask,
                                       padding_mask_from_lengths, registry)


def _qkv(seed, b=2, tq=5, tk=7, h=4, hkv=4, d=8):
    r = np.random.RandomState(seed)
    return (r.randn(b, tq, h, d).astype(np.float32), r.randn(b, tk, hkv, d).astype(np.float32),
            r.randn(b, tk, hkv, d).astype(np.float32))


@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_matches_numpy_without_mask(hkv):
    q, k, v = _qkv(0, hkv=hkv)
    out = dot_product_attention(q, k, v)
    np.testing.assert_allclose(out, reference.attention(q, k, v), atol=1e-5)


def test_matches_numpy_with_padding_causal_and_bias():
    q, k, v = _qkv(1, tq=6, tk=6, hkv=2)
    lengths = np.array([4, 6])
    mask = padding_mask_from_lengths(lengths, 6)
    bias = np.random.RandomState(2).randn(1, 4, 6, 6).astype(np.float32)
    out = dot_product_attention(q, k, v, mask=mask, bias=bias, causal=True)
    ref = reference.attention(q, k, v, mask=np.asarray(mask), bias=bias, causal=True)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_fully_masked_row_is_zero_and_finite():
    q, k, v = _qkv(3)
    mask = np.ones((2, 1, 5, 7), bool)
    mask[0, :, 2] = False  # query 2 of batch 0 sees nothing
    out = np.asarray(dot_product_attention(q, k, v, mask=mask))
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[0, 2], 0.0)
    grads = jax.grad(lambda q: dot_product_attention(q, k, v, mask=mask).sum())(q)
    assert np.isfinite(np.asarray(grads)).all()


def test_arbitrary_leading_dims_and_unbatched():
    q, k, v = _qkv(4)
    out = dot_product_attention(q, k, v)
    extra = dot_product_attention(q[None], k[None], v[None])
    np.testing.assert_allclose(extra[0], out, atol=1e-6)
    np.testing.assert_allclose(dot_product_attention(q[0], k[0], v[0]), out[0], atol=1e-6)
    vm = jax.vmap(dot_product_attention)(q, k, v)
    np.testing.assert_allclose(vm, out, atol=1e-6)


def test_mask_builders():
    m = np.asarray(combine_masks(padding_mask(np.array([[1, 1, 0]], bool)), causal_mask(3)))
    assert m.shape == (1, 1, 3, 3)
    expected = np.array([[1, 0, 0], [1, 1, 0], [1, 1, 0]], bool)
    np.testing.assert_array_equal(m[0, 0], expected)
    assert combine_masks(None, None) is None


def test_weights_sum_to_one_and_dropout_is_random():
    q, k, v = _qkv(5)
    w = np.asarray(attention_weights(q, k))
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    a = dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.PRNGKey(0),
                              deterministic=False)
    b = dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.PRNGKey(1),
                              deterministic=False)
    assert not np.allclose(a, b)
    with pytest.raises(ValueError, match="dropout_rng"):
        dot_product_attention(q, k, v, dropout_rate=0.5, deterministic=False)


def test_bad_shapes_are_reported():
    q, k, v = _qkv(6)
    with pytest.raises(ValueError, match=r"does not broadcast.*\(2, 4, 5, 7\)"):
        dot_product_attention(q, k, v, mask=np.ones((2, 1, 5, 6), bool))
    with pytest.raises(ValueError, match="heads"):
        dot_product_attention(q, k[:, :, :3], v[:, :, :3])


def _mha_and_input(seed=0, **kw):
    mha = MultiHeadAttention(num_heads=4, **kw)
    x = jax.random.normal(jax.random.PRNGKey(seed), (2, 6, 16))
    params = mha.init(jax.random.PRNGKey(seed + 1), x)
    return mha, params, x


def test_mha_matches_reference_and_vmap():
    mha, params, x = _mha_and_input()
    out = mha.apply(params, x, causal=True)
    ref = reference.mha_from_params(params["params"], np.asarray(x, np.float64), causal=True)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    vm = jax.vmap(lambda xi: mha.apply(params, xi, causal=True))(x)
    np.testing.assert_allclose(vm, out, atol=1e-6)


def test_mha_cross_attention_and_gqa_shapes():
    mha, params, x = _mha_and_input(num_kv_heads=2)
    assert params["params"]["key"]["kernel"].shape == (16, 2, 4)
    mem = jax.random.normal(jax.random.PRNGKey(9), (2, 9, 16))
    cross = MultiHeadAttention(num_heads=4, num_kv_heads=1)
    p = cross.init(jax.random.PRNGKey(0), x, mem)
    assert cross.apply(p, x, mem).shape == x.shape


def test_causality_by_gradient():
    mha, params, x = _mha_and_input(position="rope")
    t = 3
    jac = jax.jacobian(lambda x: mha.apply(params, x, causal=True)[0, t].sum())(x)
    jac = np.abs(np.asarray(jac[0]))
    assert jac[t + 1:].max() == 0.0
    assert jac[: t + 1].max() > 0.0


def test_sow_weights_is_off_by_default_and_returns_probabilities():
    mha, params, x = _mha_and_input()
    _, state = mha.apply(params, x, mutable=["intermediates"])
    assert "intermediates" not in state or not state["intermediates"]
    _, state = mha.apply(params, x, sow_weights=True, mutable=["intermediates"])
    (w,) = state["intermediates"]["attention_weights"]
    assert w.shape == (2, 4, 6, 6)
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, atol=1e-6)


def test_cudnn_refuses_with_reason():
    _, params, x = _mha_and_input()
    cudnn = MultiHeadAttention(num_heads=4, attention=AttentionConfig(kind="cudnn"))
    reason = "backend is 'cpu'" if jax.default_backend() == "cpu" else "not float32"
    with pytest.raises(ValueError, match=reason):
        cudnn.apply(params, x)  # float32 input: never valid for cuDNN flash attention


def test_unknown_kernel_name():
    with pytest.raises(ValueError, match="valid:.*xla"):
        registry.get("flashy")


def test_masks_of_every_key_only_rank_and_a_float_mask():
    """A `[kv]` or `[1, kv]` key mask is key padding for every kernel (the sparse ones
    once called `[kv]` "query-dependent"; the cuDNN path indexed a `[1, kv]` mask's
    missing head axis), and a float mask is refused: read as "nonzero = may attend",
    an additive 0 / -1e9 mask would be inverted silently."""
    from transformer_jax.attention import registry
    from transformer_jax.attention.variants.local import local_attention
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 7, 2, 4)).astype(np.float32) for _ in range(3))
    valid = np.array([True, True, False, True, True, False, False])
    want = reference.attention(q, k, v, mask=valid[None, None, None, :])
    for mask in (valid, valid[None, :]):
        for got in (dot_product_attention(q, k, v, mask=mask),
                    local_attention(q, k, v, mask=mask, window=8),
                    registry.flash_attention(q, k, v, mask=mask, implementation="xla")):
            np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="mask must be boolean.*got dtype float32.*as `bias`"):
        dot_product_attention(q, k, v, mask=np.where(valid, 0.0, -1e9).astype(np.float32))
