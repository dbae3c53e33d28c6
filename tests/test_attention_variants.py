"""Efficient attention variants against independent references.

Dense-mask equivalents of every sparse pattern are built here with plain numpy
loops from the papers' definitions; the exact forward reference is the float64
loop implementation in `reference.py`; gradients are compared with the dense
`xla` kernel under the same mask. Shapes are small and lengths are not multiples
of the block/chunk, so internal padding is exercised everywhere.
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reference
from transformer_jax.attention import AttentionConfig, MultiHeadAttention, functional, registry
from transformer_jax.attention.variants import (linear_attention_init_state,
                                                linear_attention_recurrent_step)
from transformer_jax.attention.variants.bigbird import bigbird_attention, random_blocks
from transformer_jax.attention.variants.chunked import chunked_attention
from transformer_jax.attention.variants.linear import linear_attention
from transformer_jax.attention.variants.local import local_attention
from transformer_jax.attention.variants.longformer import longformer_attention
from transformer_jax.attention.variants.performer import (FEATURE_EPS,
                                                          orthogonal_random_features,
                                                          performer_attention)
from transformer_jax.models import BertForPreTraining, GPT, get_config

B, N, H, KV, D = 2, 37, 4, 2, 8  # N = 37 is a multiple of no block or chunk used below
VALID_LEN = np.array([N, 29])    # second sequence padded


def _qkv(seed=0, n=N, scale=1.0):
    rng = np.random.default_rng(seed)  # numpy: no jax.random program to compile per shape
    q = scale * rng.standard_normal((B, n, H, D), np.float32)
    k = scale * rng.standard_normal((B, n, KV, D), np.float32)
    v = rng.standard_normal((B, n, KV, D), np.float32)
    return q, k, v


def _key_mask(n=N):
    return (np.arange(n)[None, :] < VALID_LEN[:, None])[:, None, None, :]  # [B, 1, 1, n]


# --- dense equivalents, by the papers' definitions --------------------------------------

def local_dense(n, w, causal):
    m = np.zeros((n, n), bool)
    for i in range(n):
        for j in range(n):
            m[i, j] = (0 <= i - j <= w) if causal else abs(i - j) <= w
    return m


def longformer_dense(n, w, is_global, causal):
    """is_global [B, n] -> [B, 1, n, n]: window, or either end global (Beltagy et al. 2020)."""
    m = np.zeros((len(is_global), 1, n, n), bool)
    for b, g in enumerate(is_global):
        for i in range(n):
            for j in range(n):
                ok = abs(i - j) <= w or g[i] or g[j]
                m[b, 0, i, j] = ok and (j <= i or not causal)
    return m


def bigbird_dense(n, block, num_global, rand, causal):
    """rand [H, nb, r] (-1 = none) -> [H, n, n]. ITC globals: first ceil(g/2), last floor(g/2) blocks."""
    nb = -(-n // block)
    glob = set(range((num_global + 1) // 2)) | set(range(nb - num_global // 2, nb))
    m = np.zeros((rand.shape[0], n, n), bool)
    for h in range(rand.shape[0]):
        for i in range(n):
            for j in range(n):
                bi, bj = i // block, j // block
                ok = bi in glob or bj in glob or abs(bi - bj) <= 1 or bj in set(rand[h, bi])
                m[h, i, j] = ok and (j <= i or not causal)
    return m


def _out_and_grads(fn, q, k, v, ct):
    """fn's output and the gradient of sum(out * ct) w.r.t. q, k, v."""
    f = lambda q, k, v: (lambda out: (jnp.sum(out * ct), out))(fn(q, k, v))
    (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


@jax.jit
def _dense_out_and_grads(q, k, v, mask, ct):
    """Full attention under an explicit `[B, H, N, N]` mask: compiled once for every test."""
    return _out_and_grads(lambda q, k, v: functional.dot_product_attention(q, k, v, mask=mask),
                          q, k, v, ct)


def _check_against_dense(fn, dense_mask, seed):
    """fn(q, k, v) -> out must equal masked full attention, forward and gradients, to 1e-5."""
    q, k, v = _qkv(seed)
    mask = np.broadcast_to(np.asarray(_key_mask()) & dense_mask, (B, H, N, N))
    ct = np.random.default_rng(seed + 7).standard_normal(q.shape, np.float32)
    out, got = jax.jit(functools.partial(_out_and_grads, fn))(q, k, v, ct)
    np.testing.assert_allclose(out, reference.attention(q, k, v, mask=mask), atol=1e-5, rtol=1e-5)
    _, want = _dense_out_and_grads(q, k, v, mask, ct)
    for g, w in zip(got, want):
        assert float(jnp.abs(w).max()) > 1e-3  # the gradient is not trivially zero
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


# --- exact kernels -----------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_chunked_equals_full_attention(causal):
    fn = lambda q, k, v: chunked_attention(q, k, v, mask=_key_mask(), causal=causal,
                                           query_chunk=8, key_chunk=16)
    pattern = np.tril(np.ones((N, N), bool)) if causal else np.ones((N, N), bool)
    _check_against_dense(fn, pattern, seed=1)


def test_chunked_takes_query_masks_bias_and_empty_rows():
    """Cached decoding passes a query-dependent mask over the cache; ALiBi passes a bias."""
    q, k, v = _qkv(2)
    q = q[:, :5]
    rng = np.random.default_rng(4)
    mask = rng.random((B, 1, 5, N)) < 0.7
    mask[0, 0, 2] = False  # a query that may attend to nothing gives zeros, as the reference
    bias = rng.standard_normal((H, 5, N), np.float32)
    out = jax.jit(lambda q, k, v, m, b: chunked_attention(q, k, v, mask=m, bias=b, query_chunk=2,
                                                         key_chunk=16))(q, k, v, mask, bias)
    want = reference.attention(q, k, v, mask=mask, bias=bias)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(out[0, 2]).max()) == 0.0


def test_chunked_serves_cached_decoding_in_multihead_attention():
    """Prefill + one-token steps over the KV cache (a query-dependent mask, causal=False)
    reproduce the full causal forward pass of the dense kernel with the same parameters."""
    x = np.random.default_rng(6).standard_normal((2, 9, 16), np.float32)
    chunked = MultiHeadAttention(num_heads=2, attention=AttentionConfig(kind="chunked", query_chunk=2,
                                                                        key_chunk=4))
    dense = MultiHeadAttention(num_heads=2)
    params = dense.init(jax.random.PRNGKey(0), x)["params"]
    want = dense.apply({"params": params}, x, causal=True)
    cache = jax.eval_shape(lambda: chunked.init(jax.random.PRNGKey(0), x, decode=True))["cache"]
    cache = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), cache)
    step = jax.jit(lambda c, xs: chunked.apply({"params": params, "cache": c}, xs, decode=True,
                                               mutable=["cache"]))
    out, state = step(cache, x[:, :6])
    outs = [out]
    for t in range(6, 9):
        out, state = step(state["cache"], x[:, t:t + 1])
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), want, atol=1e-5, rtol=1e-5)


# --- sparse kernels against their dense masks --------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_local_equals_dense_window(causal):
    fn = lambda q, k, v: local_attention(q, k, v, mask=_key_mask(), causal=causal, window=5)
    _check_against_dense(fn, local_dense(N, 5, causal), seed=10)


@pytest.mark.parametrize("causal", [False, True])
def test_longformer_equals_dense_window_plus_globals(causal):
    per_token = np.zeros((B, N), bool)
    per_token[0, [9, 30]] = True  # per-token globals on top of the configured [CLS] position
    per_token[1, 20] = True
    fn = lambda q, k, v: longformer_attention(q, k, v, mask=_key_mask(), causal=causal, window=4,
                                              global_positions=(0,), global_mask=per_token,
                                              max_global=4)
    is_global = per_token.copy()
    is_global[:, 0] = True
    _check_against_dense(fn, longformer_dense(N, 4, is_global, causal), seed=20)


@pytest.mark.parametrize("causal,num_random", [(False, 2), (True, 2), (False, 0)])
def test_bigbird_equals_dense_block_pattern(causal, num_random):
    # num_random=0 with H > 1 heads once crashed (a [H, nb, 0] block table for one layout row).
    block, nb = 4, -(-N // 4)
    rand = random_blocks(nb, H, num_window=3, num_global=2, num_random=num_random, seed=3,
                         causal=causal)
    fn = lambda q, k, v: bigbird_attention(q, k, v, mask=_key_mask(), causal=causal, block_size=block,
                                           num_random_blocks=num_random, random_seed=3)
    _check_against_dense(fn, bigbird_dense(N, block, 2, rand, causal), seed=30)


def test_bigbird_random_blocks_are_seeded_and_disjoint_from_window_and_globals():
    kw = dict(num_window=3, num_global=2, num_random=3, causal=False)
    a = random_blocks(32, 4, seed=0, **kw)
    np.testing.assert_array_equal(a, random_blocks(32, 4, seed=0, **kw))
    assert not np.array_equal(a, random_blocks(32, 4, seed=1, **kw))
    assert not np.array_equal(a[0], a[1])  # heads draw different blocks
    rows = np.arange(32)[None, :, None]
    picked = a[:, 1:-1]  # rows of non-global blocks
    assert (picked >= 0).all()
    assert (np.abs(picked - rows[:, 1:-1]) > 1).all() and not np.isin(picked, [0, 31]).any()
    causal = random_blocks(32, 4, seed=0, **{**kw, "causal": True})
    assert ((causal < rows) | (causal == -1)).all()


def test_sparse_kernels_never_build_an_n_by_n_array():
    """No intermediate of the forward+backward program has n*n/4 elements (the dense
    kernel has several), so the memory is O(n) for a fixed window/block."""
    n = 1024
    q = k = v = jnp.ones((1, n, 1, 8))
    mask = jnp.ones((1, 1, 1, n), bool)
    kernels = {
        "xla": lambda q, k, v: functional.dot_product_attention(q, k, v, mask=mask),
        "chunked": lambda q, k, v: chunked_attention(q, k, v, mask=mask, causal=True),
        "local": lambda q, k, v: local_attention(q, k, v, mask=mask, window=32),
        "longformer": lambda q, k, v: longformer_attention(q, k, v, mask=mask, window=32),
        "bigbird": lambda q, k, v: bigbird_attention(q, k, v, mask=mask, block_size=16),
    }

    def largest(jaxpr):
        sizes = [math.prod(x.aval.shape) for e in jaxpr.eqns for x in e.outvars]
        for e in jaxpr.eqns:
            for p in e.params.values():
                for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        sizes.append(largest(inner))
        return max(sizes, default=0)

    for name, fn in kernels.items():
        loss = lambda q, k, v: jnp.sum(fn(q, k, v))
        size = largest(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr)
        assert (size >= n * n) if name == "xla" else (size < n * n // 4), (name, size)


def _grad_temp_bytes(fn, n, heads=1, head_dim=64):
    """Temporary memory XLA allots to the compiled gradient of sum(fn(q, k, v)) (compile only)."""
    x = jax.ShapeDtypeStruct((1, n, heads, head_dim), jnp.float32)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2)))
    return grad.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes


def test_chunked_causal_gradient_memory_is_linear():
    """Issue 17: a `cond` skipping future key chunks made autodiff stack a copy of k, v
    per key step, O(n² d / key_chunk) (21.7 MiB at n=2048, 75 MiB at 4096 for one
    head). The causal gradient must cost about what the bidirectional one does and
    grow linearly; at head_dim 64 the old quadratic term is already dominant."""
    temp = {(causal, n): _grad_temp_bytes(
        functools.partial(chunked_attention, causal=causal), n)
        for causal in (False, True) for n in (2048, 4096)}
    for n in (2048, 4096):
        assert temp[True, n] < 1.5 * temp[False, n], (n, temp)
    assert temp[True, 4096] < 2.2 * temp[True, 2048], temp   # linear: x2, quadratic: x4


# --- kernelized attention ---------------------------------------------------------------

def test_linear_causal_equals_masked_quadratic_form_and_recurrence():
    q, k, v = _qkv(40)
    mask = _key_mask()
    linear = jax.jit(linear_attention, static_argnames=("causal", "chunk"))
    out = linear(q, k, v, mask=mask, causal=True, chunk=8)
    phi = lambda x: np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0)))  # elu(x) + 1
    g = H // KV
    fq = phi(np.asarray(q, np.float64))
    fk = phi(np.repeat(np.asarray(k, np.float64), g, axis=2))
    vv = np.repeat(np.asarray(v, np.float64), g, axis=2)
    a = np.einsum("bqhm,bkhm->bhqk", fq, fk) * np.tril(np.ones((N, N))) * np.asarray(mask)
    want = np.einsum("bhqk,bkhd->bqhd", a, vv) / np.swapaxes(a.sum(-1), 1, 2)[..., None]
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)

    state = linear_attention_init_state((B,), H, D, D)
    step = jax.jit(linear_attention_recurrent_step)
    outs = []
    for t in range(N):
        state, o = step(state, q[:, t], k[:, t], v[:, t])
        outs.append(o)
    parallel = linear(q, k, v, mask=None, causal=True, chunk=8)
    np.testing.assert_allclose(jnp.stack(outs, axis=1), parallel, atol=1e-5, rtol=1e-5)
    # Non-causal: every query sees every valid key.
    full = linear(q, k, v, mask=mask, causal=False)
    a = np.einsum("bqhm,bkhm->bhqk", fq, fk) * np.asarray(mask)
    want = np.einsum("bhqk,bkhd->bqhd", a, vv) / np.swapaxes(a.sum(-1), 1, 2)[..., None]
    np.testing.assert_allclose(full, want, atol=1e-5, rtol=1e-5)


def test_performer_error_falls_with_feature_count():
    q, k, v = _qkv(50, scale=0.6)  # moderate norms, as in Choromanski et al. Fig. 3
    mask = _key_mask()
    errors = {}
    fn = lambda w, causal: performer_attention(q, k, v, w, mask=mask, causal=causal, chunk=8)
    approx = jax.jit(jax.vmap(fn, in_axes=(0, None)), static_argnums=1)  # w: [seeds, m, d]
    for causal in (False, True):
        exact = reference.attention(q, k, v, mask=mask, causal=causal)
        for m in (16, 256):
            w = jnp.stack([orthogonal_random_features(m, D, seed) for seed in range(3)])
            errors[causal, m] = float(np.abs(np.asarray(approx(w, causal)) - exact).mean())
    for causal in (False, True):
        assert errors[causal, 256] < 0.5 * errors[causal, 16], errors
    assert errors[False, 256] < 0.05, errors


def _favor_reference(q, k, v, w, valid, causal):
    """The FAVOR+ estimator in float64 loops: query i weighs valid key j (j <= i when
    causal) by phi(q_i) . (exp(l_j - M_i) + eps), l = w x' - |x'|^2 / 2 with x' = x / d^(1/4),
    M_i the largest l over the keys query i sees (the shift cancels but for eps)."""
    q, k, v, w = (np.asarray(x, np.float64) for x in (q, k, v, w))
    k, v = np.repeat(k, H // KV, axis=2), np.repeat(v, H // KV, axis=2)
    logits = lambda x: (x * D ** -0.25) @ w.T - 0.5 * np.sum((x * D ** -0.25) ** 2, -1, keepdims=True)
    out = np.zeros(q.shape)
    for b in range(q.shape[0]):
        for h in range(H):
            lq, lk = logits(q[b, :, h]), logits(k[b, :, h])
            fq = np.exp(lq - lq.max(-1, keepdims=True)) + FEATURE_EPS
            for i in range(q.shape[1]):
                seen = [j for j in range(k.shape[1]) if valid[b, j] and (j <= i or not causal)]
                if seen:
                    top = max(lk[j].max() for j in seen)
                    weights = np.array([fq[i] @ (np.exp(lk[j] - top) + FEATURE_EPS) for j in seen])
                    out[b, i, h] = weights @ v[b, seen, h] / weights.sum()
    return out


def test_performer_equals_its_estimator_and_causal_outputs_ignore_later_keys():
    """Causal FAVOR+ once shifted every key by a maximum over all keys, future ones
    included, so a later key changed earlier outputs through the feature eps."""
    n = 13
    q, k, v = _qkv(51, n=n)
    valid = np.ones((B, n), bool)
    valid[1, 0], valid[1, 9:] = False, False   # a leading hole and right padding
    w = orthogonal_random_features(16, D, 0)
    fn = jax.jit(performer_attention, static_argnames=("causal", "chunk"))
    for causal in (True, False):
        got = fn(q, k, v, w, mask=valid[:, None, None, :], causal=causal, chunk=4)
        np.testing.assert_allclose(got, _favor_reference(q, k, v, w, valid, causal), atol=2e-6)
    later_k, later_v = k.copy(), v.copy()
    later_k[:, -1] *= 6.0
    later_v[:, -1] += 5.0
    before, after = (fn(q, kk, vv, w, causal=True, chunk=4) for kk, vv in ((k, v), (later_k, later_v)))
    np.testing.assert_array_equal(np.asarray(before)[:, :-1], np.asarray(after)[:, :-1])


@pytest.mark.parametrize("kind", [name for name in registry.names() if registry.get(name).make_extra])
def test_scanned_layers_equal_unrolled_for_kernels_with_extras(kind):
    """Kernels that make constants or parameters per module (performer's random
    features once differed per layer unrolled but not scanned) compute the same
    function with `scan_layers`."""
    from transformer_jax.config import TransformerConfig
    from transformer_jax.stacks import Encoder, stack_layers
    attn = AttentionConfig(kind=kind, num_features=16, linformer_k=4, linformer_max_len=12)
    kw = dict(d_model=16, num_heads=2, d_ff=32, num_layers=2, dropout=0.0, attention_dropout=0.0,
              init_std=0.5, attention=attn)
    x = np.random.default_rng(52).standard_normal((2, 12, 16)).astype(np.float32)
    unrolled = Encoder(TransformerConfig(**kw))
    params = unrolled.init(jax.random.PRNGKey(0), x)["params"]
    scanned = Encoder(TransformerConfig(**kw, scan_layers=True))
    np.testing.assert_allclose(scanned.apply({"params": stack_layers(params, 2)}, x),
                               unrolled.apply({"params": params}, x), atol=1e-5)


# --- models: linformer, training under jit, validation -----------------------------------

TINY = dict(num_layers=1, d_model=32, num_heads=2, d_ff=64, vocab_size=50, max_len=64,
            dropout=0.0, attention_dropout=0.0)
SMALL_ATTN = dict(query_chunk=16, key_chunk=16, window=8, block_size=8, num_random_blocks=1,
                  linformer_k=8, linformer_max_len=48, num_features=32, linear_chunk=8)


@functools.lru_cache(maxsize=None)
def _init(model, n):
    """Parameters of a tiny model, shared by the variants whose parameter trees agree
    (models are hashable dataclasses). An "rbg" key compiles faster than threefry."""
    ids = jnp.zeros((2, n), jnp.int32)
    return jax.jit(model.init)(jax.random.key(0, impl="rbg"), ids)["params"]


def _train(model, params, args, kwargs, loss_fn, steps=6):
    """`steps` Adam steps on one batch in one jitted program (one compilation per
    variant). Returns the loss and the gradients at every step."""
    opt = optax.adam(3e-3)

    def run(params):
        def step(carry, _):
            params, opt_state = carry
            loss = lambda p: loss_fn(model.apply({"params": p}, *args, **kwargs))
            value, grads = jax.value_and_grad(loss)(params)
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), (value, grads)

        _, (losses, grads) = jax.lax.scan(step, (params, opt.init(params)), None, steps)
        return losses, grads

    return jax.jit(run)(params)


@pytest.mark.parametrize("kind,family", [
    ("chunked", "gpt"), ("local", "gpt"), ("longformer", "bert"), ("bigbird", "bert"),
    ("linformer", "bert"), ("linear", "gpt"), ("performer", "gpt")])
def test_variant_trains_a_tiny_model(kind, family):
    n = 40
    ids = np.random.default_rng(7).integers(0, TINY["vocab_size"], (2, n))
    valid = jnp.arange(n)[None] < jnp.array([[n], [33]])
    onehot = jax.nn.one_hot(ids, TINY["vocab_size"])
    attn = dict(SMALL_ATTN, kind=kind)
    kwargs = dict(attention_mask=valid)
    init_attn = attn if kind == "linformer" else dict(kind="xla")  # same tree, shared init
    if family == "gpt":
        model = GPT(get_config("gpt-tiny", **TINY, attention=attn))
        params = _init(GPT(get_config("gpt-tiny", **TINY, attention=init_attn)), n)
        loss_fn = lambda logits: -jnp.mean(
            jnp.sum(jax.nn.log_softmax(logits[:, :-1]) * onehot[:, 1:], -1) * valid[:, 1:])
    else:
        model = BertForPreTraining(get_config("bert-tiny", **TINY, attention=attn))
        params = _init(BertForPreTraining(get_config("bert-tiny", **TINY, attention=init_attn)), n)
        if kind == "longformer":  # per-token global flags reach the kernel through the model
            kwargs["global_mask"] = jnp.arange(n)[None] % 13 == 5
        loss_fn = lambda out: -jnp.mean(
            jnp.sum(jax.nn.log_softmax(out["mlm_logits"]) * onehot, -1) * valid)
    losses, grads = _train(model, params, (ids,), kwargs, loss_fn)
    losses = np.asarray(losses)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.05, losses
    if kind == "linformer":  # its projections are parameters that receive gradients
        g = [x for path, x in jax.tree_util.tree_flatten_with_path(grads)[0] if "linformer_e" in str(path)]
        assert g and float(jnp.abs(g[0]).max()) > 0
        too_long = jnp.zeros((1, SMALL_ATTN["linformer_max_len"] + 8), jnp.int32)
        with pytest.raises(ValueError, match="linformer_max_len=48"):
            jax.eval_shape(lambda p: model.apply({"params": p}, too_long), params)


@pytest.mark.parametrize("kind,model_kwargs,match", [
    ("linformer", dict(causal=True), "cannot be causal"),
    ("bigbird", dict(position="alibi"), "position='alibi'"),
    ("longformer", dict(position="alibi"), "position='alibi'"),
    ("local", dict(position="alibi"), "position='alibi'"),
    ("linear", dict(attention_dropout=0.1), "attention_dropout=0.1"),
    ("performer", dict(attention_dropout=0.1), "attention_dropout=0.1"),
])
def test_validation_rejects_combinations_a_kernel_cannot_honour(kind, model_kwargs, match):
    kw = {"causal": False, "position": "learned", "attention_dropout": 0.0, **model_kwargs}
    with pytest.raises(ValueError, match=match):
        registry.validate(AttentionConfig(kind=kind), **kw)


def test_validation_through_model_configs_and_bad_fields():
    with pytest.raises(ValueError, match="linformer.*cannot be causal"):
        get_config("gpt-tiny", attention={"kind": "linformer"})
    with pytest.raises(ValueError, match="alibi"):
        get_config("bert-tiny", position="alibi", attention={"kind": "bigbird"})
    get_config("gpt-tiny", position="alibi", attention={"kind": "chunked"})  # exact: bias is fine
    get_config("gpt-tiny", attention={"kind": "bigbird"})                   # causal block-sparse
    for field, value, kind in [("window", -1, "local"), ("num_window_blocks", 2, "bigbird"),
                               ("block_size", 0, "bigbird"), ("num_features", 0, "performer"),
                               ("query_chunk", 0, "chunked"), ("linformer_k", 0, "linformer"),
                               ("global_positions", (-1,), "longformer")]:
        with pytest.raises(ValueError, match=field):
            registry.validate(AttentionConfig(kind=kind, **{field: value}), causal=False,
                              position="learned", attention_dropout=0.0)


def test_multihead_refuses_what_a_sparse_kernel_cannot_take():
    x = jnp.ones((1, 12, 16))
    mha = MultiHeadAttention(num_heads=2, attention=AttentionConfig(kind="local", window=4))
    params = jax.eval_shape(mha.init, jax.random.PRNGKey(1), x)  # errors come at trace time
    apply = lambda *a, **kw: jax.eval_shape(lambda p: mha.apply(p, *a, **kw), params)
    with pytest.raises(ValueError, match="key padding masks"):
        apply(x, mask=jnp.tril(jnp.ones((12, 12), bool))[None])
    with pytest.raises(ValueError, match="self-attention"):
        apply(x, jnp.ones((1, 7, 16)))
    with pytest.raises(ValueError, match="no cached decoding"):
        apply(x, decode=True)
    with pytest.raises(ValueError, match="global_positions"):
        jax.eval_shape(lambda q, k, v: longformer_attention(q, k, v, global_positions=(12,)),
                       *_qkv(0, n=12))


class _KernelExtra(nn.Module):
    """Owns the parameters / random features a registered kernel's `make_extra` makes."""
    kind: str
    config: AttentionConfig
    shape: tuple  # (q_len, kv_len, heads, kv_heads, head_dim)
    param_dtype: jnp.dtype = jnp.float32  # as MultiHeadAttention's, read by make_extra

    @nn.compact
    def __call__(self):
        q_len, kv_len, heads, kv_heads, head_dim = self.shape
        return registry.get(self.kind).make_extra(self, self.config, q_len=q_len, kv_len=kv_len,
                                                  num_heads=heads, num_kv_heads=kv_heads,
                                                  head_dim=head_dim)


def _registry_call(name, q, k, v, mask=None, bias=None):
    """Calls the kernel registered as `name` directly (the documented path without
    `MultiHeadAttention`)."""
    variant, config = registry.get(name), AttentionConfig(kind=name, linformer_max_len=q.shape[1])
    extra = {}
    if variant.make_extra is not None:
        shape = (q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3])
        extra, _ = _KernelExtra(name, config, shape).init_with_output(jax.random.PRNGKey(0))
    return variant.fn(q, k, v, mask=mask, bias=bias, causal=False, config=config, extra=extra,
                      dropout_rate=0.0, dropout_rng=None, deterministic=True)


@pytest.mark.parametrize("name", registry.names())
def test_every_registered_kernel_validates_mask_and_bias_at_entry(name):
    """Issue 17: a key mask of length 60 for 64 keys made `local` and `bigbird` treat
    the last keys as padding, a longer one was cut, and `longformer` / `linear` gave
    broadcasting TypeErrors. Every kernel must refuse a mask or bias that does not
    broadcast to the scores, with the dense kernel's error, before anything else."""
    n = 16
    q, k, v = (x[:, :n] for x in _qkv(3))   # [B, n, H, D], k/v with KV heads
    dense = functools.partial(functional.dot_product_attention, q, k, v)
    bad_masks = {"short": np.ones((B, 1, 1, n - 4), bool), "long": np.ones((B, 1, 1, n + 4), bool),
                 "batch": np.ones((B + 1, 1, 1, n), bool)}
    for label, mask in bad_masks.items():
        with pytest.raises(ValueError) as want:
            dense(mask=mask)
        with pytest.raises(ValueError, match="attention mask of shape") as got:
            _registry_call(name, q, k, v, mask=mask)
        assert str(got.value) == str(want.value), label
    # A kernel with a bias refuses a wrong-shaped one; one without refuses any (it used
    # to drop it silently).
    if registry.get(name).supports_bias:
        bias, match = np.zeros((B, H, n, n - 4), np.float32), "attention bias of shape"
    else:
        bias, match = np.zeros((B, H, n, n), np.float32), f"kind='{name}' does not support an additive bias"
    with pytest.raises(ValueError, match=match):
        _registry_call(name, q, k, v, bias=bias)


# The accelerator kernels are checked on their devices (tests/test_speed_switches.py,
# tests/test_splash.py); on a CPU they refuse to run.
@pytest.mark.parametrize("name", [n for n in registry.names()
                                  if n != "cudnn" and not n.startswith("splash")])
def test_every_kernel_keeps_nan_and_ignores_what_padding_holds(name):
    """A NaN query or key comes out as NaN rows, as the dense kernel's do (safe_divide
    turned them into exact zeros in six kernels, hiding divergence). Padded keys, what
    ever they hold, change nothing, and a sequence with no real key has finite
    gradients: Performer took exp() of padded logits before masking them (inf * 0 =
    NaN gradients for every projection; output 0 when a padded logit overflowed)."""
    n = 16
    q, k, v = (x[:, :n] for x in _qkv(5))
    call = lambda q, k, v, mask: _registry_call(name, q, k, v, mask=mask)
    nan_q = q.copy()
    nan_q[0, 5, 0, 0] = np.nan
    out = np.asarray(call(nan_q, k, v, None))
    assert np.isnan(out[0, 5, 0]).all() and np.isfinite(out[1]).all()
    nan_k = k.copy()
    nan_k[0, 5, 0, 0] = np.nan
    assert np.isnan(np.asarray(call(q, nan_k, v, None))[0]).any()
    mask = np.ones((B, 1, 1, n), bool)
    mask[0, ..., 10:] = False
    mask[1] = False                        # no real key at all
    loud = k.copy()
    loud[:, 10:] = 30.0 * np.abs(loud[:, 10:])   # padded keys whose logits overflow exp
    a, b = np.asarray(call(q, k, v, mask)), np.asarray(call(q, loud, v, mask))
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert np.isfinite(a).all()
    grads = jax.grad(lambda q, k, v: jnp.sum(call(q, k, v, mask) ** 2), argnums=(0, 1, 2))(
        q, loud, v)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_kernels_called_directly_validate_their_mask():
    """The documented direct path (docs/attention.md, "Calling the kernels directly")
    gives the dense kernel's error too, and longformer checks its global_mask's batch."""
    q, k, v = _qkv(4, n=16)
    short = np.ones((B, 1, 1, 12), bool)
    with pytest.raises(ValueError) as want:
        functional.dot_product_attention(q, k, v, mask=short)
    features = orthogonal_random_features(16, D, 0)
    for fn in (local_attention, longformer_attention, bigbird_attention, linear_attention,
               chunked_attention, lambda *a, **kw: performer_attention(*a, features, **kw)):
        with pytest.raises(ValueError) as got:
            fn(q, k, v, mask=short)
        assert str(got.value) == str(want.value), fn
    with pytest.raises(ValueError, match=r"global_mask of shape \(3, 16\) must broadcast"):
        longformer_attention(q, k, v, global_mask=np.zeros((3, 16), bool))


def test_kernels_called_directly_and_attention_configs_refuse_unusable_sizes():
    """A window of -1 gave all-zero outputs, num_window_blocks=2 ran as 3, a block size
    or chunk of 0 a ZeroDivisionError: each is a ValueError naming the argument (or
    the config field) and the kind."""
    q, k, v = _qkv(6, n=16)
    features = orthogonal_random_features(16, D, 0)
    calls = [
        (lambda: local_attention(q, k, v, window=-1), r"window=-1 is invalid for kind='local'"),
        (lambda: longformer_attention(q, k, v, max_global=-1),
         r"max_global=-1 is invalid for kind='longformer'"),
        (lambda: bigbird_attention(q, k, v, block_size=0), r"block_size=0 is invalid"),
        (lambda: bigbird_attention(q, k, v, block_size=4, num_window_blocks=2),
         r"num_window_blocks=2 must be odd"),
        (lambda: bigbird_attention(q, k, v, block_size=4, num_random_blocks=-1),
         r"num_random_blocks=-1 is invalid"),
        (lambda: chunked_attention(q, k, v, key_chunk=-4), r"key_chunk=-4 is invalid for kind='chunked'"),
        (lambda: linear_attention(q, k, v, causal=True, chunk=0), r"chunk=0 is invalid for kind='linear'"),
        (lambda: performer_attention(q, k, v, features, causal=True, chunk=0),
         r"chunk=0 is invalid for kind='performer'"),
        (lambda: AttentionConfig(kind="nope"), r"attention.kind='nope' is not a known attention"),
        (lambda: AttentionConfig(kind="local", window=-2),
         r"attention.window=-2 is invalid for kind='local'"),
        (lambda: AttentionConfig(kind="bigbird", block_size=0), r"attention.block_size=0 is invalid"),
    ]
    for call, match in calls:
        with pytest.raises(ValueError, match=match):
            call()
    # A config built unchecked (as an old pickle might be) is checked on the registry path.
    config = AttentionConfig(kind="local")
    object.__setattr__(config, "window", -1)
    with pytest.raises(ValueError, match=r"attention.window=-1 is invalid for kind='local'"):
        registry.get("local").fn(q, k, v, mask=None, bias=None, causal=False, config=config,
                                 extra={}, dropout_rate=0.0, dropout_rng=None, deterministic=True)


def test_encoder_decoder_keeps_cross_attention_dense():
    """A sparse self-attention kind leaves cross-attention dense (LED / BigBird
    encoder-decoders), and Linformer is refused because the decoder is causal."""
    import jax
    import numpy as np
    import pytest
    from transformer_jax.models import EncoderDecoder, get_config
    with pytest.raises(ValueError, match="linformer.*cannot be causal"):
        get_config("transformer-tiny", attention={"kind": "linformer"})
    tiny = dict(vocab_size=50, max_len=32, num_layers=1, num_decoder_layers=1, d_model=32,
                num_heads=4, d_ff=64, dropout=0.0, attention_dropout=0.0)
    src = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 50)
    tgt = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, 50)
    local = EncoderDecoder(get_config("transformer-tiny", **tiny, attention={"kind": "local", "window": 64}))
    dense = EncoderDecoder(get_config("transformer-tiny", **tiny))
    params = dense.init(jax.random.PRNGKey(2), src, tgt)
    # A window wider than both sequences makes `local` equal to dense attention.
    np.testing.assert_allclose(local.apply(params, src, tgt), dense.apply(params, src, tgt), atol=1e-5)


@pytest.mark.parametrize("name", registry.names())
def test_exact_flag_says_which_kernels_compute_full_softmax_attention(name):
    """`AttentionVariant.exact` lets HF export (hf/config.py) accept a kernel; it must
    be True exactly for the kernels whose output is dense softmax attention. Small
    windows / blocks / projections make every other pattern differ at n=16."""
    if name == "cudnn" or name.startswith("splash"):
        pytest.skip("GPU / TPU-block kernel: its equality with xla is tested in "
                    "test_speed_switches.py / test_splash.py")
    n = 16
    q, k, v = (x[:, :n] for x in _qkv(5))
    mask = np.arange(n)[None, None, None, :] < np.array([n, 11])[:, None, None, None]
    config = AttentionConfig(kind=name, window=2, global_positions=(0,), block_size=4,
                             num_window_blocks=1, num_global_blocks=1, num_random_blocks=1,
                             linformer_k=4, linformer_max_len=n, num_features=8,
                             query_chunk=8, key_chunk=8, linear_chunk=8)
    variant, extra = registry.get(name), {}
    if variant.make_extra is not None:
        shape = (n, n, H, KV, D)
        extra, _ = _KernelExtra(name, config, shape).init_with_output(jax.random.PRNGKey(0))
    got = variant.fn(q, k, v, mask=mask, bias=None, causal=False, config=config, extra=extra,
                     dropout_rate=0.0, dropout_rng=None, deterministic=True)
    want = reference.attention(q, k, v, mask=mask)
    same = float(np.max(np.abs(np.asarray(got) - want))) < 1e-5
    assert same == variant.exact, (name, variant.exact)


@pytest.mark.parametrize("name", registry.names())
def test_cross_attention_flag_says_which_kernels_serve_cross_attention(name):
    """`AttentionVariant.cross_attention` keeps a kernel in a decoder's cross-attention
    (`blocks.cross_attention_config`): a flagged kernel must equal softmax attention with
    q_len != kv_len under a random key mask; any other kind is replaced by "xla" there."""
    from transformer_jax.blocks import cross_attention_config
    config = AttentionConfig(kind=name, query_chunk=4, key_chunk=4)
    variant = registry.get(name)
    if not variant.cross_attention:
        assert cross_attention_config(config) == config.replace(kind="xla")
        return
    assert cross_attention_config(config) is config
    rng = np.random.default_rng(6)
    q = rng.standard_normal((B, 5, H, D), np.float32)
    k, v = (rng.standard_normal((B, 11, KV, D), np.float32) for _ in range(2))
    keys = rng.random((B, 11)) < 0.5
    keys[np.arange(B), rng.integers(0, 11, B)] = True  # every row has a key to attend to
    mask = keys[:, None, None, :]
    if name == "cudnn" and registry.cudnn_unavailable_reason(jnp.bfloat16):
        # No GPU: the same code on XLA's implementation of jax.nn.dot_product_attention.
        got = registry.flash_attention(q, k, v, mask=mask, implementation="xla")
    else:
        if name == "cudnn":
            q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
        got = variant.fn(q, k, v, mask=mask, bias=None, causal=False, config=config, extra={},
                         dropout_rate=0.0, dropout_rng=None, deterministic=True)
    tol = 3e-2 if name == "cudnn" and got.dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(got, np.float64),
                               reference.attention(q.astype(np.float32), k.astype(np.float32),
                                                   v.astype(np.float32), mask=mask), atol=tol)
