"""Speed switches change how the step runs, never what it computes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.models import GPT, BertForPreTraining, get_config

TINY = dict(vocab_size=101, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_len=16,
            dropout=0.0, attention_dropout=0.0)


def _loss_and_grads(model, params, ids):
    def loss(p):
        out = model.apply({"params": p}, ids)
        logits = out["mlm_logits"] if isinstance(out, dict) else out
        return jax.nn.log_softmax(logits.astype(jnp.float32))[..., 3].mean()
    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("family", ["gpt-tiny", "bert-tiny"])
@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_identical_loss_and_gradients(family, policy):
    ids = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 101)
    build = GPT if family == "gpt-tiny" else BertForPreTraining
    plain = build(get_config(family, **TINY))
    remat = build(get_config(family, **TINY, remat=policy))
    params = plain.init(jax.random.PRNGKey(1), ids)["params"]
    assert jax.tree.structure(params) == jax.tree.structure(
        jax.eval_shape(remat.init, jax.random.PRNGKey(1), ids)["params"])
    (l1, g1), (l2, g2) = _loss_and_grads(plain, params, ids), _loss_and_grads(remat, params, ids)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)


def test_vocab_padding_only_adds_unused_rows():
    ids = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 101)
    padded = GPT(get_config("gpt-tiny", **TINY, vocab_pad_multiple=64))
    params = padded.init(jax.random.PRNGKey(1), ids)["params"]
    table = params["embeddings"]["token"]["embedding"]
    assert table.shape == (128, 32)
    logits = padded.apply({"params": params}, ids)
    assert logits.shape == (2, 16, 101)
    sliced = {**params, "embeddings": {**params["embeddings"], "token": {"embedding": table[:101]}}}
    reference = GPT(get_config("gpt-tiny", **TINY)).apply({"params": sliced}, ids)
    np.testing.assert_allclose(logits, reference, atol=1e-6)
    with pytest.raises(ValueError, match="vocab_pad_multiple=0 must be a positive integer"):
        get_config("gpt-tiny", vocab_pad_multiple=0)
    with pytest.raises(ValueError, match="remat='some' is not valid"):
        get_config("gpt-tiny", remat="some")


# --- fused QKV, chunked loss, scanned layers, the cuDNN key-length path -------------

from transformer_jax.attention import MultiHeadAttention, functional, registry  # noqa: E402
from transformer_jax.models import EncoderDecoder, generate  # noqa: E402
from transformer_jax.stacks import stack_layers, unstack_layers  # noqa: E402
from transformer_jax.training import (create_train_state, grouped_norms, make_optimizer,  # noqa: E402
                                      make_train_step)


# Some gradients are taken under jit (one program per side instead of many eagerly
# dispatched ops, where that measured faster); both sides of a comparison alike.
def _assert_trees_close(a, b, atol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol, rtol=1e-5), a, b)


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_fused_qkv_matches_separate_projections(kv_heads):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 7, 32)), jnp.float32)
    memory = jnp.asarray(rng.standard_normal((2, 5, 24)), jnp.float32)
    for inputs in ((x,), (x, memory)):  # self-attention, cross-attention
        fused = MultiHeadAttention(num_heads=4, num_kv_heads=kv_heads, fused_qkv=True)
        plain = fused.clone(fused_qkv=False)
        params = jax.jit(plain.init)(jax.random.PRNGKey(1), *inputs)
        assert jax.tree.structure(params) == jax.tree.structure(
            jax.eval_shape(fused.init, jax.random.PRNGKey(1), *inputs))
        f = lambda m: jax.jit(jax.value_and_grad(lambda p: jnp.sum(m.apply(p, *inputs) ** 2)))(params)
        (l1, g1), (l2, g2) = f(plain), f(fused)
        np.testing.assert_allclose(l1, l2, rtol=1e-6)
        _assert_trees_close(g1, g2, 1e-6)
        assert not np.allclose(g1["params"]["key"]["kernel"], 0)


def test_projection_init_draws_as_dense_general():
    """Same draws as nn.DenseGeneral for a key, with fan-based inits seeing 2-D fans."""
    import flax.linen as nn
    from transformer_jax.attention.multihead import HeadProjection
    xavier = nn.initializers.xavier_normal()
    ours, _ = HeadProjection((32, 4, 8), False, jnp.float32, xavier).init_with_output(
        jax.random.PRNGKey(3))
    dense = nn.DenseGeneral((4, 8), use_bias=False, kernel_init=xavier).init(
        jax.random.PRNGKey(3), jnp.ones((1, 32)))
    np.testing.assert_array_equal(ours[0], dense["params"]["kernel"])


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_loss_equals_whole_logits(tie):
    """Per-token nll/accuracy and gradients, with a chunk that does not divide B*L and a
    padded vocabulary, against log-softmax of the full logits."""
    ids = jax.random.randint(jax.random.PRNGKey(0), (3, 16), 0, 101)
    targets = jax.random.randint(jax.random.PRNGKey(2), (3, 16), 0, 101)
    config = get_config("gpt-tiny", **TINY, vocab_pad_multiple=64, tie_embeddings=tie)
    params = jax.jit(GPT(config).init)(jax.random.PRNGKey(1), ids)["params"]

    def reference(p):
        logits = GPT(config).apply({"params": p}, ids).astype(jnp.float32)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
        return nll.mean(), (jnp.argmax(logits, -1) == targets)

    def chunked(p):
        out = GPT(config.replace(loss_chunk=10)).apply({"params": p}, ids, targets,
                                                       method="token_stats")
        return out["nll"].mean(), out["correct"]

    (l1, c1), g1 = jax.jit(jax.value_and_grad(reference, has_aux=True))(params)
    (l2, c2), g2 = jax.jit(jax.value_and_grad(chunked, has_aux=True))(params)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    np.testing.assert_array_equal(c1, c2 > 0)
    _assert_trees_close(g1, g2, 1e-6)
    with pytest.raises(ValueError, match="loss_chunk=-1 must be 0"):
        config.replace(loss_chunk=-1)
    with pytest.raises(ValueError, match="fused_qkv='yes' must be True or False"):
        config.replace(fused_qkv="yes")


@pytest.mark.parametrize("family", ["gpt-tiny", "transformer-tiny"])   # decoder; encoder + decoder
def test_scanned_layers_compute_the_unrolled_stack(family):
    ids = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 101)
    config = get_config(family, **TINY, **({"num_decoder_layers": 3} if family == "transformer-tiny" else {}))
    model = {"gpt-tiny": GPT, "bert-tiny": BertForPreTraining, "transformer-tiny": EncoderDecoder}[family]
    args = (ids, ids) if family == "transformer-tiny" else (ids,)
    plain, scanned = model(config), model(config.replace(scan_layers=True, remat="dots"))
    params = plain.init(jax.random.PRNGKey(1), *args)["params"]
    stacked = {k: stack_layers(v, 3 if k == "decoder" and family == "transformer-tiny" else 2)
               for k, v in params.items()}
    assert jax.tree.structure(stacked) == jax.tree.structure(
        jax.eval_shape(scanned.init, jax.random.PRNGKey(1), *args)["params"])
    assert jax.tree.structure(unstack_layers(stacked)) == jax.tree.structure(params)

    def loss(m, p):
        out = m.apply({"params": p}, *args)
        return sum(jnp.sum(jnp.sin(x.astype(jnp.float32))) for x in jax.tree.leaves(out))
    (l1, g1) = jax.value_and_grad(lambda p: loss(plain, p))(params)
    (l2, g2) = jax.value_and_grad(lambda p: loss(scanned, p))(stacked)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    _assert_trees_close(g1, unstack_layers(g2), 2e-5)
    n1, per1 = grouped_norms(g1)
    n2, per2 = grouped_norms(g2)
    assert sorted(per1) == sorted(per2) and any("layer_1" in k for k in per1)
    np.testing.assert_allclose([per1[k] for k in sorted(per1)], [per2[k] for k in sorted(per1)],
                               rtol=1e-5)


def test_scanned_gpt_generates_the_same_tokens():
    config = get_config("gpt-tiny", **TINY)
    prompts = np.random.default_rng(0).integers(0, 101, size=(2, 5))
    params = GPT(config).init(jax.random.PRNGKey(1), prompts)["params"]
    plain = generate(GPT(config), params, prompts, max_new_tokens=6, temperature=0.0)
    scanned = generate(GPT(config.replace(scan_layers=True)), stack_layers(params, 2), prompts,
                       max_new_tokens=6, temperature=0.0)
    np.testing.assert_array_equal(plain.tokens, scanned.tokens)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_path_masks_equal_reference(causal):
    """`flash_attention` (the cuDNN call) with padding masks of any pattern, run with the
    XLA implementation on CPU, equals the reference kernel. `auto` is the reference on CPU."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((3, 9, 2, 8)), jnp.float32) for _ in range(3))
    prefix = (np.arange(9)[None] < np.array([9, 4, 6])[:, None])[:, None, None, :]
    holes = prefix.copy()
    holes[0, 0, 0, 2] = False                       # an inner hole
    left = prefix[:, :, :, ::-1]                    # left padding
    skipped = 0
    for mask in (prefix, holes, left, None):
        mask = None if mask is None else jnp.asarray(mask)
        ref = functional.dot_product_attention(q, k, v, mask=mask, causal=causal)
        out = registry.flash_attention(q, k, v, mask=mask, causal=causal, implementation="xla")
        # Compare queries that see at least one key (a fully masked row is padding).
        seen = np.ones((3, 1, 9, 9), bool) if mask is None else np.broadcast_to(mask, (3, 1, 9, 9))
        seen = (seen & (np.tril(np.ones((9, 9), bool)) if causal else seen)).any(-1)[:, 0]
        np.testing.assert_allclose(np.asarray(out)[seen], np.asarray(ref)[seen], atol=1e-6)
        auto = registry.get("auto").fn(q, k, v, mask=mask, bias=None, causal=causal, config=None,
                                       extra={}, dropout_rate=0.0, dropout_rng=None,
                                       deterministic=True)
        np.testing.assert_array_equal(auto, ref)
        skipped += int((~seen).sum())
    assert (skipped > 0) == causal   # only left padding under causality leaves such rows


def test_flash_path_takes_every_shape_the_reference_takes():
    """2-D masks and biases `[q, kv]` (IndexError: `x.shape[-3]`) and a query batch of
    one against k/v of two (a reshape to q's shape) were refused by the cuDNN call
    while the reference kernel took them."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((1, 7, 2, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 7, 2, 8)), jnp.float32) for _ in range(2))
    tril = jnp.asarray(np.tril(np.ones((7, 7), bool)))
    bias = jnp.asarray(rng.standard_normal((7, 7)), jnp.float32)
    for kw in (dict(mask=tril), dict(mask=jnp.ones((1, 7), bool), causal=True), dict(bias=bias),
               dict()):
        ref = functional.dot_product_attention(q, k, v, **kw)
        out = registry.flash_attention(q, k, v, implementation="xla", **kw)
        assert out.shape == ref.shape == (2, 7, 2, 8)
        np.testing.assert_allclose(out, ref, atol=1e-5)


def test_optimized_train_step_tracks_the_plain_one():
    """The issue's numerics check: every switch on vs every switch off, from the same
    parameters (stacked and padded for the fast layout) and batches, through the
    real (jitted, donating) train step."""
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 101, size=(4, 17)) for _ in range(4)]
    plain = get_config("gpt-tiny", **TINY, fused_qkv=False)
    fast = plain.replace(fused_qkv=True, loss_chunk=24, scan_layers=True, remat="dots",
                         vocab_pad_multiple=64)
    init = create_train_state(plain, make_optimizer(3e-3), jax.random.PRNGKey(0), task="lm").params
    table = init["embeddings"]["token"]["embedding"]
    padded = jnp.concatenate([table, jax.random.normal(jax.random.PRNGKey(5), (27, 32))])
    fast_params = stack_layers({**init, "embeddings": {**init["embeddings"],
                                                       "token": {"embedding": padded}}}, 2)
    losses = {}
    for name, config, params in (("plain", plain, init), ("fast", fast, fast_params)):
        state = create_train_state(config, make_optimizer(3e-3), jax.random.PRNGKey(0), task="lm",
                                   params=jax.tree.map(jnp.copy, params))
        step = make_train_step("lm")
        losses[name] = []
        for b in batches:
            state, metrics = step(state, {"input_ids": b[:, :-1], "targets": b[:, 1:],
                                          "loss_mask": np.ones((4, 16), np.float32)})
            losses[name].append(float(metrics["loss"]))
    assert losses["plain"][-1] < losses["plain"][0]
    np.testing.assert_allclose(losses["plain"], losses["fast"], rtol=1e-5)


def test_flash_path_gradients_with_reordered_keys():
    """The key reordering (argsort + gather) must carry gradients back to the right keys."""
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 7, 2, 8)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(rng.random((2, 1, 1, 7)) < 0.6).at[:, :, :, 0].set(True)
    ct = jnp.asarray(rng.standard_normal((2, 7, 2, 8)), jnp.float32)
    grads = [jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * ct), argnums=(0, 1, 2)))(q, k, v)
             for f in (lambda q, k, v: functional.dot_product_attention(q, k, v, mask=mask),
                       lambda q, k, v: registry.flash_attention(q, k, v, mask=mask,
                                                                implementation="xla"))]
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert float(jnp.abs(grads[0][1]).max()) > 0
