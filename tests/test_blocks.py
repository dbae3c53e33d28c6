"""Blocks: residual placements against hand-written float64 formulas."""
import jax
import numpy as np
import pytest
import reference

from transformer_jax.attention import AttentionConfig
from transformer_jax.blocks import DecoderBlock, EncoderBlock
from transformer_jax.config import TransformerConfig
from transformer_jax.normalization import deepnorm_constants, make_norm
from transformer_jax.positional import alibi_slopes
from transformer_jax.stacks import Decoder, Encoder, stack_layers

CFG = TransformerConfig(d_model=16, num_heads=4, d_ff=32, dropout=0.0, attention_dropout=0.0,
                        layer_norm_eps=1e-6)


def _x(seed=0, shape=(2, 5, 16)):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _randomize(params, seed=1):
    """Random values everywhere (including norm scales/biases, which init to 1/0)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [l + 0.3 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


def _ln(p, x):
    return reference.layer_norm(x, np.asarray(p["scale"], np.float64), np.asarray(p["bias"], np.float64), 1e-6)


@pytest.fixture(scope="module")
def shared_params():
    block = EncoderBlock(CFG.replace(norm_placement="post"))
    return _randomize(block.init(jax.random.PRNGKey(0), _x())["params"])


def test_post_and_pre_ln_match_formulas_and_differ(shared_params):
    x = _x()
    x64 = np.asarray(x, np.float64)
    p = shared_params
    post = EncoderBlock(CFG.replace(norm_placement="post")).apply({"params": p}, x)
    pre = EncoderBlock(CFG.replace(norm_placement="pre")).apply({"params": p}, x)
    # post: LN(x + Attn(x)), then LN(h + FFN(h))
    h = _ln(p["attention_norm"], x64 + reference.mha_from_params(p["attention"], x64))
    ref_post = _ln(p["mlp_norm"], h + reference.ffn_from_params(p["mlp"], h))
    # pre: x + Attn(LN(x)), then h + FFN(LN(h))
    h = x64 + reference.mha_from_params(p["attention"], _ln(p["attention_norm"], x64))
    ref_pre = h + reference.ffn_from_params(p["mlp"], _ln(p["mlp_norm"], h))
    np.testing.assert_allclose(post, ref_post, atol=1e-4)
    np.testing.assert_allclose(pre, ref_pre, atol=1e-4)
    assert np.abs(np.asarray(post) - np.asarray(pre)).max() > 1e-2


def test_deepnorm_scales_residual(shared_params):
    x = _x()
    x64 = np.asarray(x, np.float64)
    p = shared_params
    alpha, beta = deepnorm_constants("encoder", 6)["encoder"]
    assert np.isclose(alpha, 12 ** 0.25) and np.isclose(beta, 48 ** -0.25)
    out = EncoderBlock(CFG.replace(norm_placement="deepnorm"), alpha=alpha, beta=beta).apply({"params": p}, x)
    h = _ln(p["attention_norm"], alpha * x64 + reference.mha_from_params(p["attention"], x64))
    ref = _ln(p["mlp_norm"], alpha * h + reference.ffn_from_params(p["mlp"], h))
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_deepnorm_init_scales_value_and_ffn_by_beta():
    cfg = CFG.replace(norm_placement="deepnorm", d_model=64, d_ff=256)
    x = _x(shape=(1, 3, 64))
    p = EncoderBlock(cfg, beta=0.25).init(jax.random.PRNGKey(0), x)["params"]
    std = lambda a: float(np.std(np.asarray(a)))
    # Xavier normal: std = gain * sqrt(2 / (fan_in + fan_out)).
    assert np.isclose(std(p["attention"]["query"]["kernel"]), np.sqrt(2 / 128), rtol=0.1)
    assert np.isclose(std(p["attention"]["value"]["kernel"]), 0.25 * np.sqrt(2 / 128), rtol=0.1)
    assert np.isclose(std(p["mlp"]["up"]["kernel"]), 0.25 * np.sqrt(2 / 320), rtol=0.1)


@pytest.mark.parametrize("placement", ["post", "pre", "sandwich", "deepnorm"])
@pytest.mark.parametrize("norm_type", ["layernorm", "rmsnorm"])
def test_decoder_block_vmap_and_causality(placement, norm_type):
    cfg = CFG.replace(norm_placement=placement, norm_type=norm_type, activation="swiglu")
    block = DecoderBlock(cfg, cross_attention=True)
    x, mem = _x(1), _x(2, (2, 4, 16))
    params = block.init(jax.random.PRNGKey(0), x, mem)
    out = block.apply(params, x, mem)
    vm = jax.vmap(lambda a, m: block.apply(params, a, m))(x, mem)
    np.testing.assert_allclose(vm, out, atol=1e-5)
    jac = jax.jacobian(lambda x: block.apply(params, x, mem)[0, 2].sum())(x)
    assert np.abs(np.asarray(jac[0, 3:])).max() == 0.0


def test_cross_attention_memory_width_error():
    block = DecoderBlock(CFG, cross_attention=True)
    x = _x()
    params = block.init(jax.random.PRNGKey(0), x, x)
    with pytest.raises(ValueError, match=r"memory has width 8.*d_model=16"):
        block.apply(params, x, _x(3, (2, 4, 8)))


@pytest.mark.parametrize("one_hot", [False, True])
def test_embed_lookup_and_gradient_against_numpy(one_hot):
    """`Embed` returns the table's rows (cast to the compute dtype) exactly, and its
    gradient is the float64 scatter-add of the upstream gradient onto the looked-up
    rows, summed in float32 even with bfloat16 compute."""
    import jax.numpy as jnp
    from transformer_jax.embeddings import Embed
    ids = np.random.default_rng(0).integers(0, 3, (4, 50))   # few rows: heavy collisions
    module = Embed(3, 8, one_hot=one_hot, dtype=jnp.bfloat16)
    params = module.init(jax.random.PRNGKey(1), ids)
    table = np.asarray(params["params"]["embedding"])
    out = module.apply(params, ids)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out, table.astype(jnp.bfloat16)[ids])
    upstream = np.random.default_rng(2).normal(size=(4, 50, 8)).astype(np.float32)
    grad = jax.grad(lambda p: (module.apply(p, ids).astype(jnp.float32) * upstream).sum())(params)
    expected = np.zeros((3, 8))
    np.add.at(expected, ids, upstream.astype(jnp.bfloat16).astype(np.float64))
    np.testing.assert_allclose(grad["params"]["embedding"], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="embedding ids must be integers"):
        module.apply(params, ids.astype(np.float32))


@pytest.mark.parametrize("norm_type", ["layernorm", "rmsnorm"])
def test_norm_matches_float64_with_large_common_offset(norm_type):
    """Vectors sharing a large offset (as residual streams and imported checkpoints do)
    must still normalise to float64 precision in float32: the one-pass variance
    E[x²] − E[x]² loses ~offset²·eps_fp32 to cancellation (4e-3 off at offset 20),
    the two-pass E[(x − E[x])²] does not. RMSNorm has no mean to subtract."""
    from transformer_jax.normalization import make_norm
    rng = np.random.default_rng(0)
    x = (20.0 + rng.normal(size=(4, 7, 256))).astype(np.float32)
    norm = make_norm(norm_type, 1e-5, None, np.float32, "norm")
    params = _randomize(norm.init(jax.random.PRNGKey(0), x))
    out = np.asarray(norm.apply(params, x), np.float64)
    p = {k: np.asarray(v, np.float64) for k, v in params["params"].items()}
    x64 = x.astype(np.float64)
    if norm_type == "layernorm":
        ref = reference.layer_norm(x64, p["scale"], p["bias"], 1e-5)
    else:
        ref = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5) * p["scale"]
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)


def test_encoder_forwards_kernel_kwargs_to_every_layer_unrolled_and_scanned():
    """A per-call kernel input (Longformer's `global_mask`) reaches every layer of the
    stack, unrolled, scanned and rematerialised alike: it equals the same global
    tokens given by the config (`global_positions`, which the mask adds to), an
    independent route."""
    attn = AttentionConfig(kind="longformer", window=2)
    cfg = CFG.replace(num_layers=2, attention=attn)
    x = _x(shape=(2, 12, 16))
    params = _randomize(Encoder(cfg).init(jax.random.PRNGKey(0), x)["params"])
    glob = (np.arange(12) % 5 == 1)[None]   # tokens 1, 6, 11, besides the default 0
    by_config = cfg.replace(attention=attn.replace(global_positions=(0, 1, 6, 11)))
    from_config = Encoder(by_config).apply({"params": params}, x)
    assert np.abs(np.asarray(from_config - Encoder(cfg).apply({"params": params}, x))).max() > 1e-2
    for layout in (dict(), dict(scan_layers=True, remat="full")):
        p = stack_layers(params, 2) if layout else params
        got = Encoder(cfg.replace(**layout)).apply({"params": p}, x, global_mask=glob)
        np.testing.assert_allclose(got, from_config, atol=1e-5)


def test_decoder_forwards_kernel_kwargs_like_the_encoder():
    """The Decoder's causal self-attention gets per-call kernel inputs too: Longformer's
    `global_mask` equals the same global tokens set in the config."""
    attn = AttentionConfig(kind="longformer", window=2)
    cfg = CFG.replace(num_layers=1, attention=attn)
    x = _x(shape=(2, 12, 16))
    params = _randomize(Decoder(cfg).init(jax.random.PRNGKey(0), x)["params"])
    glob = (np.arange(12) % 5 == 1)[None]
    by_config = cfg.replace(attention=attn.replace(global_positions=(0, 1, 6, 11)))
    want = Decoder(by_config).apply({"params": params}, x)
    assert np.abs(np.asarray(want - Decoder(cfg).apply({"params": params}, x))).max() > 1e-2
    got = Decoder(cfg).apply({"params": params}, x, global_mask=glob)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_call_time_argument_no_kernel_reads_is_refused_not_dropped():
    """`global_mask=` on a kind other than Longformer, or a misspelt one, was silently
    ignored: the encoder ran without the global tokens the caller asked for."""
    x = _x(shape=(2, 12, 16))
    glob = (np.arange(12) % 5 == 1)[None]
    for kind, kwargs, match in [
            ("local", dict(global_mask=glob),
             r"kind='local' takes no call-time argument 'global_mask'; it is read by kind "
             r"'longformer'"),
            ("longformer", dict(gloabl_mask=glob), r"'gloabl_mask'; no kind reads it")]:
        cfg = CFG.replace(num_layers=1, attention=AttentionConfig(kind=kind, window=2))
        params = Encoder(cfg).init(jax.random.PRNGKey(0), x)["params"]
        with pytest.raises(ValueError, match=match):
            Encoder(cfg).apply({"params": params}, x, **kwargs)


@pytest.mark.parametrize("bad, match", [
    (dict(dropout="0.1"), "dropout='0.1' must be in"),
    (dict(attention_dropout=None), "attention_dropout=None must be in"),
    (dict(layer_norm_eps=-1.0), "layer_norm_eps=-1.0 must be a positive number"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps=0.0 must be a positive number"),
    (dict(rope_base=0.0), "rope_base=0.0 must be a positive number"),
    (dict(use_bias="yes"), "use_bias='yes' must be True or False"),
    (dict(tie_embeddings=1), "tie_embeddings=1 must be True or False"),
    (dict(attention=dict(kind="longformer", global_positions=0)),
     r"attention.global_positions=0 must be a tuple of ints"),
    (dict(attention=dict(kind="bigbird", random_seed=-1)), r"attention.random_seed=-1 is invalid"),
])
def test_config_fields_are_checked_where_they_enter(bad, match):
    """Each was once accepted, then gave NaN outputs (eps <= 0, rope_base <= 0), a
    TypeError naming no field, or silently truthy flags."""
    with pytest.raises(ValueError, match=match):
        if "attention" in bad:
            bad = dict(attention=AttentionConfig(**bad["attention"]))
        TransformerConfig(**bad)


def test_a_list_of_global_positions_keeps_the_config_hashable():
    config = AttentionConfig(kind="longformer", global_positions=[0, 3])
    assert config.global_positions == (0, 3)
    assert hash(config) == hash(AttentionConfig(kind="longformer", global_positions=(0, 3)))


@pytest.mark.parametrize("module, match", [
    (dict(num_heads=2, attention=dict(kind="chunked", query_chunk=0)),
     "attention.query_chunk=0 is invalid for kind='chunked'"),
    (dict(num_heads=2, attention=dict(kind="local", window=-1)),
     "attention.window=-1 is invalid for kind='local'"),
    (dict(num_heads=2, attention=dict(kind="performer", num_features=0)),
     "attention.num_features=0 is invalid"),
    (dict(num_heads=2, position="ropee"), "position='ropee' is not valid"),
    (dict(num_heads=0), "num_heads=0 must be a positive integer"),
    (dict(num_heads=3), "input width 8 is not divisible by num_heads=3"),
    (dict(num_heads=2, dropout_rate=-0.5), r"dropout_rate=-0.5 must be in \[0, 1\)"),
])
def test_multihead_attention_built_directly_checks_its_fields(module, match):
    """The README builds MultiHeadAttention without a TransformerConfig: its fields
    and AttentionConfig once went unchecked (ZeroDivisionError, silent no-ops). A size
    no kind can use is refused by AttentionConfig itself, before any module."""
    from transformer_jax.attention import MultiHeadAttention
    x = np.random.default_rng(0).standard_normal((1, 12, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=match):
        if "attention" in module:
            module = {**module, "attention": AttentionConfig(**module["attention"])}
        jax.eval_shape(MultiHeadAttention(**module).init, jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match=r"inputs_q must be \[..., seq, features\], got shape \(8,\)"):
        jax.eval_shape(MultiHeadAttention(num_heads=2).init, jax.random.PRNGKey(0), x[0, 0])


def test_replace_names_an_unknown_field():
    """`replace` once raised dataclasses' TypeError; it is a ValueError listing the fields."""
    config = TransformerConfig()
    with pytest.raises(ValueError, match=r"TransformerConfig.replace: 'n_layers' is not a field "
                                         r"of TransformerConfig; valid fields: vocab_size"):
        config.replace(n_layers=3)
    with pytest.raises(ValueError, match=r"AttentionConfig.replace: 'kindd' is not a field"):
        config.replace(attention={"kindd": "xla"})


@pytest.mark.parametrize("build, match", [
    (lambda: make_norm("rms_norm", 1e-5, np.float32, np.float32, "n"),
     "norm_type='rms_norm' is not valid; choose one of 'layernorm', 'rmsnorm'"),
    (lambda: make_norm("layernorm", -1.0, np.float32, np.float32, "n"),
     "eps=-1.0 must be a positive number"),
    (lambda: deepnorm_constants("encoder", 0), "num_encoder_layers=0 is not valid"),
    (lambda: deepnorm_constants("bert", 6), "arch='bert' is not valid"),
    (lambda: alibi_slopes(0), "num_heads=0 must be a positive integer"),
])
def test_norm_and_position_helpers_called_directly_check_their_arguments(build, match):
    """Helpers the config checks for its own calls, called directly: an unknown norm
    name once fell through to LayerNorm, eps -1 gave NaN, a DeepNorm depth of 0 was a
    ZeroDivisionError and alibi_slopes(0) a math domain error."""
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("stack, match", [
    (lambda cfg: Encoder(cfg, arch="encoder_decoder"), "num_decoder_layers=0 is not valid: DeepNorm"),
    (lambda cfg: Decoder(cfg, arch="encoder_decoder"), "num_encoder_layers=0 is not valid: DeepNorm"),
    (lambda cfg: Encoder(cfg, arch="decoder"), "Encoder.arch='decoder' is not valid"),
    (lambda cfg: Decoder(cfg.replace(norm_placement="post"), arch="bert"),
     "Decoder.arch='bert' is not valid"),
])
def test_stacks_built_directly_check_arch_and_deepnorm_depths(stack, match):
    """Encoder / Decoder used alone (as a user assembling a model): their defaults for
    the other stack's depth (0) were a ZeroDivisionError under DeepNorm, and a wrong
    `arch` was ignored unless the placement was DeepNorm."""
    cfg = TransformerConfig(d_model=16, num_heads=2, d_ff=32, num_layers=2,
                            norm_placement="deepnorm")
    x = np.random.default_rng(0).standard_normal((1, 4, 16)).astype(np.float32)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(stack(cfg).init, jax.random.PRNGKey(0), x)
