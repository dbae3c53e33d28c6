"""The Pallas TPU splash attention kinds, run here in Pallas interpret mode, against
the float64 references: forward `reference.attention` under a dense mask built from
each pattern's definition, gradients from the float64 backward written out below.

Interpret mode is slow, so shapes are the smallest the kernel allows (n = 256 =
two 128-blocks, 2 query heads sharing 1 kv head (GQA), head_dim 16) and each case
compiles one forward+backward program. Run with `-s` to see the accuracy table.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from transformer_jax.attention import AttentionConfig, MultiHeadAttention, registry
from transformer_jax.attention.variants import splash

B, N, H, KV, D = 2, 256, 2, 1, 16
WINDOW, GLOBALS = 24, (0, 131)
# Padding: the first sequence has holes and a padded start (with causal attention its
# first queries see no real key: their output must be zero), the second is right-padded.
VALID = np.ones((B, N), bool)
VALID[0, :3] = VALID[0, 60:90] = False
VALID[1, 190:] = False


def dense_pattern(kind, causal):
    """The `[N, N]` pattern of each kind by its definition (Beltagy et al. 2020 for
    the window and global tokens)."""
    i, j = np.arange(N)[:, None], np.arange(N)[None, :]
    m = np.ones((N, N), bool)
    if kind != "splash":
        m = np.abs(i - j) <= WINDOW
    if kind == "splash_longformer":
        g = np.isin(np.arange(N), GLOBALS)
        m = m | g[:, None] | g[None, :]
    return m & (j <= i) if causal else m


def grads_reference(q, k, v, mask, ct):
    """float64 gradients of sum(attention(q, k, v) * ct) w.r.t. q, k, v, from
    O = P V, P = softmax(Q K^T / sqrt(d)) over the allowed keys (rows with none give
    zeros): dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(P dP)), dQ = dS K / sqrt(d),
    dK = dS^T Q / sqrt(d); GQA sums over the query heads that share a kv head."""
    q, k, v, ct = (np.asarray(a, np.float64) for a in (q, k, v, ct))
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    scale = 1.0 / math.sqrt(q.shape[-1])
    groups = q.shape[2] // k.shape[2]
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            kv = h // groups
            m = mask[b, h]
            s = np.where(m, q[b, :, h] @ k[b, :, kv].T * scale, -np.inf)
            rows = m.any(-1)
            p = np.zeros_like(s)
            p[rows] = reference.softmax(s[rows])
            dv[b, :, kv] += p.T @ ct[b, :, h]
            dp = ct[b, :, h] @ v[b, :, kv].T
            ds = p * (dp - (p * dp).sum(-1, keepdims=True))
            dq[b, :, h] = ds @ k[b, :, kv] * scale
            dk[b, :, kv] += ds.T @ q[b, :, h] * scale
    return dq, dk, dv


def _inputs(seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, N, H, D), np.float32)
    k = rng.standard_normal((B, N, KV, D), np.float32)
    v = rng.standard_normal((B, N, KV, D), np.float32)
    ct = rng.standard_normal((B, N, H, D), np.float32)
    return q, k, v, ct


def _call(kind, causal, q, k, v, mask):
    """The registered kernel, called as `MultiHeadAttention` calls it."""
    config = AttentionConfig(kind=kind, window=WINDOW, global_positions=GLOBALS)
    return registry.get(kind).fn(q, k, v, mask=mask, bias=None, causal=causal, config=config,
                                 extra={}, dropout_rate=0.0, dropout_rng=None, deterministic=True)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _out_and_grads(kind, causal, q, k, v, mask, ct):
    f = lambda q, k, v: (lambda out: (jnp.sum(out * ct), out))(_call(kind, causal, q, k, v, mask))
    (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


@pytest.mark.parametrize("kind,causal", [
    ("splash", False), ("splash", True), ("splash_local", False), ("splash_local", True),
    ("splash_longformer", False), ("splash_longformer", True)])
def test_splash_matches_float64_reference_forward_and_gradients(kind, causal):
    q, k, v, ct = _inputs(seed=len(kind) + causal)
    key_mask = VALID[:, None, None, :]                         # [B, 1, 1, N] key padding
    full = np.broadcast_to(key_mask & dense_pattern(kind, causal), (B, H, N, N))
    out, grads = _out_and_grads(kind, causal, q, k, v, key_mask, ct)
    want = reference.attention(q, k, v, mask=full)
    want_grads = grads_reference(q, k, v, full, ct)
    fwd = float(np.abs(np.asarray(out, np.float64) - want).max())
    bwd = max(float(np.abs(np.asarray(g, np.float64) - w).max()) for g, w in zip(grads, want_grads))
    print(f"\nsplash accuracy  {kind:18s} causal={causal!s:5s}  max|fwd - ref| = {fwd:.2e}  "
          f"max|grad - ref| = {bwd:.2e}")
    if causal:  # the first queries of sequence 0 see only padding: zeros, like the reference
        assert not full[0, 0, 0].any() and np.all(np.asarray(out)[0, 0] == 0)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
    for g, w in zip(grads, want_grads):
        assert np.abs(w).max() > 1e-2  # the gradient is not trivially zero
        np.testing.assert_allclose(g, w, atol=5e-5, rtol=5e-5)


def test_splash_in_multihead_attention_equals_xla():
    """The module path: the same parameters through kind='splash' and kind='xla'."""
    x = np.random.default_rng(3).standard_normal((1, 128, 32), np.float32)
    mask = VALID[1:, None, None, :128].copy()
    mask[..., 100:] = False
    mha = lambda kind: MultiHeadAttention(num_heads=2, num_kv_heads=1,
                                          attention=AttentionConfig(kind=kind))
    params = mha("xla").init(jax.random.PRNGKey(0), x)
    run = jax.jit(lambda p, kind: mha(kind).apply(p, x, mask=mask, causal=True), static_argnums=1)
    np.testing.assert_allclose(run(params, "splash"), run(params, "xla"), atol=2e-5, rtol=2e-5)


def _auto_args(n=256, mask="padding", bias=None, dropout_rate=0.0, deterministic=True, causal=True):
    q, k = jnp.zeros((2, n, 4, 128)), jnp.zeros((2, n, 2, 128))
    masks = {None: None, "padding": jnp.ones((2, 1, 1, n), bool),
             "per_head": jnp.ones((2, 4, 1, n), bool), "query": jnp.ones((1, 1, n, n), bool)}
    return (q, k), dict(mask=masks[mask], bias=bias, causal=causal, dropout_rate=dropout_rate,
                        deterministic=deterministic)


def test_auto_chooses_splash_on_a_tpu_when_shapes_allow(monkeypatch):
    args, kw = _auto_args()
    assert registry.auto_kind(*args, **kw) == "xla"            # this CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")  # a faked TPU backend
    assert registry.auto_kind(*args, **kw) == "splash"
    for case in [dict(mask=None), dict(causal=False)]:
        assert registry.auto_kind(*_auto_args(**case)[0], **_auto_args(**case)[1]) == "splash"
    for case in [dict(n=200), dict(bias=jnp.zeros((1, 4, 256, 256))),
                 dict(dropout_rate=0.1, deterministic=False), dict(mask="per_head"),
                 dict(mask="query")]:  # e.g. cached decoding
        a, k = _auto_args(**case)
        assert registry.auto_kind(*a, **k) == "xla", case
    with monkeypatch.context() as m:  # a multi-chip TPU: XLA would not partition the kernel
        m.setattr(jax, "device_count", lambda *a: 8)
        assert registry.auto_kind(*args, **kw) == "xla"
    # and `kind="auto"` then traces the Pallas kernel (lowering would need a real TPU)
    q, k = args
    jaxpr = jax.make_jaxpr(lambda q, k: _call("auto", True, q, k, k, kw["mask"]))(q, k)
    assert "pallas_call" in str(jaxpr)


@pytest.mark.parametrize("kind,model_kwargs,match", [
    ("splash", dict(attention_dropout=0.1), "attention_dropout=0.1"),
    ("splash_local", dict(position="alibi"), "position='alibi'"),
    ("splash_longformer", dict(attention_dropout=0.1), "attention_dropout=0.1"),
])
def test_validation_refuses_what_splash_cannot_honour(kind, model_kwargs, match):
    kw = {"causal": True, "position": "rope", "attention_dropout": 0.0, **model_kwargs}
    with pytest.raises(ValueError, match=match):
        registry.validate(AttentionConfig(kind=kind), **kw)
    with pytest.raises(ValueError, match="window"):
        registry.validate(AttentionConfig(kind="splash_local", window=-1), causal=False,
                          position="rope", attention_dropout=0.0)
    with pytest.raises(ValueError, match="global_positions"):
        registry.validate(AttentionConfig(kind="splash_longformer", global_positions=(-2,)),
                          causal=False, position="rope", attention_dropout=0.0)


def test_splash_refuses_unsupported_shapes_and_masks():
    q, k, v, _ = _inputs(0)
    shape = lambda kind, *a, **kw: jax.eval_shape(functools.partial(_call, kind, *a, **kw), q, k, v)
    cut = lambda x: x[:, :200]
    with pytest.raises(ValueError, match="q_len=200, kv_len=200 must be a multiple of 128"):
        jax.eval_shape(lambda *a: _call("splash", False, *a, None), cut(q), cut(k), cut(v))
    with pytest.raises(ValueError, match="one key padding mask for all heads"):
        shape("splash", False, mask=np.ones((B, H, 1, N), bool))
    with pytest.raises(ValueError, match="self-attention"):
        jax.eval_shape(lambda *a: _call("splash_local", False, *a, None), q, k[:, :128], v[:, :128])
    config = AttentionConfig(kind="splash_longformer")
    with pytest.raises(ValueError, match="global_mask"):
        jax.eval_shape(lambda q, k, v: registry.get("splash_longformer").fn(
            q, k, v, mask=None, bias=None, causal=False, config=config,
            extra={"global_mask": jnp.ones((B, N), bool)}, dropout_rate=0.0, dropout_rng=None,
            deterministic=True), q, k, v)
    with pytest.raises(ValueError, match="global_positions"):
        jax.eval_shape(lambda q, k, v: splash.splash_attention(
            q, k, v, pattern="longformer", global_positions=(N,)), q, k, v)
    x = jnp.ones((1, 128, 16))
    mha = MultiHeadAttention(num_heads=2, attention=AttentionConfig(kind="splash"))
    params = jax.eval_shape(mha.init, jax.random.PRNGKey(1), x)
    apply = lambda *a, **kw: jax.eval_shape(lambda p: mha.apply(p, *a, **kw), params)
    with pytest.raises(ValueError, match="key padding masks"):
        apply(x, mask=jnp.tril(jnp.ones((128, 128), bool))[None])
    with pytest.raises(ValueError, match="no cached decoding"):
        apply(x, decode=True)


def test_attention_scaling_tpu_mode_runs_end_to_end_in_interpret_mode(tmp_path):
    """`experiments.attention_scaling --tpu` at the smallest length: every kind is
    compiled, run and written (on a TPU the same command measures 1K-32K)."""
    import csv

    from experiments import attention_scaling
    attention_scaling.main(["--tpu", "--min-len", "128", "--max-len", "128", "--rounds", "1",
                            "--out", str(tmp_path)])
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["kind"] for r in rows] == list(attention_scaling.TPU_KINDS)
    assert all(r["status"] == "ok" and float(r["time_s"]) > 0 and float(r["peak_mb"]) > 0
               for r in rows), rows
    table = (tmp_path / "table.md").read_text()
    assert "`splash_local`" in table and "interpret mode" in table
