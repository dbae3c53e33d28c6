"""Models: published parameter counts, every preset, jit/grad/vmap, cached decoding."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.models import (PRESETS, BertForPreTraining, BertForSentenceEmbedding,
                                    BertForSequenceClassification, BertForTokenClassification,
                                    EncoderDecoder, EncoderDecoderConfig, GPT, build, generate,
                                    get_config, init_cache, init_decode_cache)

TINY = dict(vocab_size=101, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_len=32)


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _tokens(seed, shape, vocab=101):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, vocab)


def _abstract_init(config):
    model = build(config)
    ids = jnp.zeros((1, 8), jnp.int32)
    args = (ids, ids) if isinstance(config, EncoderDecoderConfig) else (ids,)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)["params"]


def test_published_parameter_counts():
    # GPT-2 small with tied embeddings (Radford et al. 2019; HF GPT2Model).
    assert _count(_abstract_init(get_config("gpt2-small"))) == 124_439_808
    # BERT-base BertModel with pooler (Devlin et al. 2018; HF BertModel).
    assert _count(_abstract_init(get_config("bert-base"))["bert"]) == 109_482_240


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_initializes_abstractly(name):
    assert _count(_abstract_init(get_config(name))) > 0


def _smallest_preset_of_each_family():
    from transformer_jax.models import registry
    size = lambda name: get_config(name).num_layers * get_config(name).d_model
    return [min(f.presets, key=size) for f in registry.families()]


@pytest.mark.parametrize("name", _smallest_preset_of_each_family())
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_presets_forward_backward_under_jit(name, dtype):
    from transformer_jax.models import family_of
    cfg = get_config(name, vocab_size=101, max_len=32, dtype=dtype)
    model = build(cfg)
    ids = _tokens(0, (2, 16))
    args = (ids, ids) if family_of(cfg).name == "seq2seq" else (ids,)   # (source, target)
    params = model.init(jax.random.PRNGKey(0), *args)["params"]

    @jax.jit
    def loss_fn(params, rng):
        out = model.apply({"params": params}, *args, deterministic=False, rngs={"dropout": rng})
        logits = out["mlm_logits"] if isinstance(out, dict) else out
        assert logits.dtype == jnp.dtype(dtype)
        return jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[..., 0])

    loss, grads = jax.value_and_grad(loss_fn)(params, jax.random.PRNGKey(1))
    assert np.isfinite(float(loss))
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))  # fp32 params
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads)) > 0


def _vmap_matches(model, params, *args, **kw):
    full = jax.jit(lambda p, *a: model.apply(p, *a, **kw))(params, *args)
    vm = jax.jit(jax.vmap(lambda p, *a: model.apply(p, *a, **kw), in_axes=(None,) + (0,) * len(args)))(
        params, *args)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), full, vm)


def test_vmap_equals_batched_for_each_model():
    ids = _tokens(1, (3, 10))
    mask = jnp.arange(10)[None, :] < jnp.array([[10], [7], [4]])
    bert = BertForPreTraining(get_config("bert-tiny", **TINY))
    params = bert.init(jax.random.PRNGKey(0), ids)
    _vmap_matches(bert, params, ids, jnp.zeros_like(ids), mask)
    gpt = GPT(get_config("gpt-tiny", **TINY, position="rope", num_kv_heads=2))
    _vmap_matches(gpt, gpt.init(jax.random.PRNGKey(0), ids), ids)
    s2s = EncoderDecoder(get_config("transformer-tiny", **TINY))
    _vmap_matches(s2s, s2s.init(jax.random.PRNGKey(0), ids, ids), ids, ids, mask, mask)


def test_bert_heads_and_mean_pooling_ignores_padding():
    cfg = get_config("bert-tiny", **TINY, dropout=0.0, attention_dropout=0.0)
    ids = _tokens(2, (2, 8))
    mask = jnp.array([[1] * 8, [1] * 5 + [0] * 3], bool)
    for head, shape in [(BertForSequenceClassification(cfg, num_labels=3), (2, 3)),
                        (BertForTokenClassification(cfg, num_labels=5), (2, 8, 5))]:
        assert jax.eval_shape(head.init_with_output, jax.random.PRNGKey(0), ids)[0].shape == shape
    emb = BertForSentenceEmbedding(cfg, pooling="mean")
    p = emb.init(jax.random.PRNGKey(0), ids)
    apply = jax.jit(lambda ids: emb.apply(p, ids, attention_mask=mask))
    a = apply(ids)
    b = apply(ids.at[1, 6].set(7))  # change a padded token
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(jnp.linalg.norm(a, axis=-1), 1.0, atol=1e-5)


def test_post_and_pre_ln_models_differ_on_same_params():
    ids = _tokens(3, (2, 8))
    post = GPT(get_config("gpt-tiny", **TINY, norm_placement="post"))
    pre = GPT(get_config("gpt-tiny", **TINY, norm_placement="pre"))
    params = pre.init(jax.random.PRNGKey(0), ids)["params"]
    params_post = {k: v for k, v in params.items()}
    params_post["decoder"] = {k: v for k, v in params["decoder"].items() if k != "final_norm"}
    a = post.apply({"params": params_post}, ids)
    b = pre.apply({"params": params}, ids)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3


@pytest.mark.parametrize("variant", [dict(), dict(position="rope", num_kv_heads=2),
                                     dict(position="alibi", num_kv_heads=1)])
def test_cached_decoding_matches_full_forward(variant):
    cfg = get_config("gpt-tiny", **TINY, **variant)
    model = GPT(cfg)
    prompt = np.asarray(_tokens(4, (2, 5)))
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(prompt))["params"]
    # Prefill 5 tokens, then 3 cached single steps, against one full pass of 8.
    seq = _tokens(5, (2, 8))
    forward = jax.jit(lambda p, ids: model.apply({"params": p}, ids))
    step = jax.jit(lambda p, c, ids: model.apply({"params": p, "cache": c}, ids, decode=True,
                                                   mutable=["cache"]))
    full = forward(params, seq)
    logits, state = step(params, init_cache(model, 2, 8), seq[:, :5])
    steps = [logits]
    for t in range(5, 8):
        logits, state = step(params, state["cache"], seq[:, t:t + 1])
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-5)
    # Greedy generation equals argmax over repeated full forward passes. The
    # reference pads to a fixed width (one compilation); causality makes the
    # padding invisible to the position being read.
    lengths = np.array([5, 3])
    out = generate(model, params, prompt, prompt_lengths=lengths, max_new_tokens=6, temperature=0)
    for b in range(2):
        ids = list(prompt[b, :lengths[b]])
        for _ in range(6):
            padded = jnp.zeros((1, 11), jnp.int32).at[0, :len(ids)].set(jnp.array(ids))
            ids.append(int(jnp.argmax(forward(params, padded)[0, len(ids) - 1])))
        assert int(out.lengths[b]) == len(ids)
        assert list(np.asarray(out.tokens[b, :len(ids)])) == ids


def test_generate_sampling_eos_and_limits():
    cfg = get_config("gpt-tiny", **TINY)
    model = GPT(cfg)
    prompt = np.asarray(_tokens(6, (3, 4)))
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(prompt))["params"]
    out = generate(model, params, prompt, max_new_tokens=20, temperature=1.0, top_k=10,
                   top_p=0.9, rng=jax.random.PRNGKey(1), eos_id=3)
    for row, n in zip(np.asarray(out.tokens), np.asarray(out.lengths)):
        gen = row[4:n]
        assert 1 <= len(gen) <= 20
        assert 3 not in gen[:-1]  # stops at the first EOS
        if len(gen) < 20:
            assert gen[-1] == 3
    with pytest.raises(ValueError, match="exceeds the model's max_len=32"):
        generate(model, params, prompt, max_new_tokens=29)
    with pytest.raises(ValueError, match=r"prompts must be in \[0, 101\) \(vocab_size=101\); got 2\d\d"):
        generate(model, params, prompt + 200, max_new_tokens=2)
    for bad in (-1.0, float("nan"), float("inf")):   # -1 used to sample near-greedily
        with pytest.raises(ValueError, match="temperature=.* must be a finite number >= 0"):
            generate(model, params, prompt, max_new_tokens=2, temperature=bad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=np.full((2, 3), 4.7)), "prompts must be integer token ids, got dtype float64"),
    (dict(prompts=np.zeros((0, 3), np.int32)), r"prompts must be \[batch, prompt_len\]"),
    (dict(prompt_lengths=np.array([2.5, 3.0])), r"prompt_lengths=\[2.5, 3.0\] must be one integer"),
    (dict(max_new_tokens=True), "max_new_tokens=True must be a positive integer"),
    (dict(max_new_tokens=2.0), "max_new_tokens=2.0 must be a positive integer"),
    (dict(eos_id=101), r"eos_id must be in \[0, 101\) \(vocab_size=101\)"),
    (dict(eos_id=3.0), r"eos_id=3.0 must be an integer token id in \[0, 101\)"),
    (dict(pad_id=-1), r"pad_id must be in \[0, 101\)"),
    (dict(pad_id=None), "pad_id=None must be an integer token id"),
    (dict(top_k=2.5), r"top_k=2.5 must be None or an integer in \[1, vocab_size=101\]"),
    (dict(top_k=True), "top_k=True must be None or an integer"),
    (dict(top_p="0.9"), r"top_p='0.9' must be None or a number in \(0, 1\]"),
    (dict(temperature=True), "temperature=True must be a finite number >= 0")])
def test_generate_rejects_bad_arguments(kwargs, match):
    # Checked before anything is traced, so the parameters are never read.
    args = dict(prompts=np.full((2, 3), 4), max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=match):
        generate(GPT(get_config("gpt-tiny", **TINY)), {}, args.pop("prompts"), **args)


@pytest.mark.parametrize("bad, match", [
    (dict(d_model=30, num_heads=4), "d_model=30 must be divisible by num_heads=4"),
    (dict(num_kv_heads=3), "num_heads=4 must be divisible by num_kv_heads=3"),
    (dict(attention={"kind": "sparse-ish"}), "attention.kind='sparse-ish'.*valid"),
    (dict(position="relative"), "position='relative' is not valid"),
    (dict(norm_placement="middle"), "norm_placement='middle' is not valid"),
    (dict(norm_type="batchnorm"), "norm_type='batchnorm' is not valid"),
    (dict(num_layers=0), "num_layers=0 must be a positive integer"),
    (dict(dropout=1.5), r"dropout=1.5 must be in \[0, 1\)"),
    (dict(attention={"kind": "chunked", "query_chunk": True}),   # not a chunk of 1
     "attention.query_chunk=True is invalid for kind='chunked': it must be an int >= 1"),
    (dict(attention={"kind": "xla", "random_seed": False}), "random_seed=False is invalid"),
])
def test_invalid_configs(bad, match):
    with pytest.raises(ValueError, match=match):
        get_config("gpt-tiny", **{**TINY, **bad})


def test_unknown_preset():
    with pytest.raises(ValueError, match="gpt-huge.*valid: bert-tiny"):
        get_config("gpt-huge")


@pytest.mark.parametrize("name, overrides, unknown", [
    ("gpt-tiny", dict(n_layers=3), "'n_layers' is not a field of GPTConfig"),
    ("bert-tiny", dict(foo=1, num_layers=1, bar=2), "'foo', 'bar' are not fields of BertConfig"),
    ("transformer-tiny", dict(decoder_layers=1), "'decoder_layers' is not a field of "
                                                 "EncoderDecoderConfig"),
    ("gpt-tiny", dict(attention={"kind": "local", "windw": 4}),
     r"attention=\): 'windw' is not a field of AttentionConfig")])
def test_unknown_override_is_named_with_the_valid_fields(name, overrides, unknown):
    with pytest.raises(ValueError, match=unknown) as err:
        get_config(name, **overrides)
    cls = type(get_config(name).attention if "attention" in overrides else get_config(name))
    listed = str(err.value).split("valid fields: ")[1].split(", ")
    assert listed == [f.name for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("name, bad, match", [
    ("bert-tiny", dict(type_vocab_size=-1), "type_vocab_size=-1 is not valid: an int >= 0"),
    ("bert-tiny", dict(type_vocab_size=2.5), "type_vocab_size=2.5 is not valid"),
    ("bert-tiny", dict(type_vocab_size=True), "type_vocab_size=True is not valid"),
    ("bert-tiny", dict(embedding_norm="yes"), "embedding_norm='yes' must be True or False"),
    ("bert-tiny", dict(embedding_norm=1), "embedding_norm=1 must be True or False"),
    ("transformer-tiny", dict(num_decoder_layers=True), "num_decoder_layers=True must be a positive"),
    ("transformer-tiny", dict(num_decoder_layers=2.0), "num_decoder_layers=2.0 must be a positive")])
def test_family_fields_are_checked_where_they_enter(name, bad, match):
    with pytest.raises(ValueError, match=match):
        get_config(name, **bad)


@pytest.mark.parametrize("name", ["gpt-tiny", "bert-tiny", "transformer-tiny"])
def test_numpy_scalars_in_a_config_become_the_python_numbers_they_equal(name):
    """np.int64 / np.float32 / np.bool_ (what numpy arithmetic returns) are taken as the
    int / float / bool they equal, family fields and attention fields included: the
    config equals and hashes like the Python-built one and survives the JSON that
    checkpoints store (json refuses np.float32 and np.int64)."""
    import json
    from transformer_jax.training.config_io import config_from_dict, config_to_dict
    family = {"gpt-tiny": dict(loss_chunk=16), "bert-tiny": dict(type_vocab_size=3),
              "transformer-tiny": dict(num_decoder_layers=3)}[name]
    python = dict(d_model=64, num_heads=4, dropout=0.25, scan_layers=True, **family,
                  attention={"kind": "xla", "global_positions": (0, 3), "random_seed": 7})
    as_numpy = lambda v: (np.bool_(v) if isinstance(v, bool) else np.int64(v)
                          if isinstance(v, int) else np.float32(v))
    numpy = {k: as_numpy(v) for k, v in python.items() if k != "attention"}
    numpy["attention"] = {"kind": "xla", "global_positions": [np.int32(0), np.int64(3)],
                          "random_seed": np.int64(7)}
    config, expected = get_config(name, **numpy), get_config(name, **python)
    assert config == expected and hash(config) == hash(expected)
    for key in (*family, "d_model", "dropout", "scan_layers"):
        assert type(getattr(config, key)) is type(python[key]), key
    assert all(type(p) is int for p in config.attention.global_positions)
    assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == expected
    with pytest.raises(ValueError, match="d_model=64.5 must be a positive integer"):
        get_config(name, d_model=np.float64(64.5))   # a non-integral value is still refused


def test_bert_without_segment_embeddings_is_valid():
    # type_vocab_size=0: `Embeddings` builds no token-type table (what `hf.config.
    # check_exportable` refuses to export, as HF BERT always has one).
    model = BertForPreTraining(get_config("bert-tiny", **TINY, type_vocab_size=0))
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    assert "token_type" not in params["params"]["bert"]["embeddings"]


def test_shape_errors():
    cfg = get_config("bert-tiny", **TINY)
    model = BertForPreTraining(cfg)
    ids = _tokens(7, (2, 8))
    params = model.init(jax.random.PRNGKey(0), ids)
    with pytest.raises(ValueError, match=r"sequence length 40.*max_len is 32"):
        model.apply(params, _tokens(7, (2, 40)))
    with pytest.raises(ValueError, match=r"attention_mask of shape \(2, 6\).*\(2, 8\)"):
        model.apply(params, ids, None, jnp.ones((2, 6), bool))


def test_concat_position_embeddings():
    cfg = get_config("gpt-tiny", **TINY, embed_combine="concat")
    model = GPT(cfg)
    ids = _tokens(8, (2, 8))
    params = model.init(jax.random.PRNGKey(0), ids)["params"]
    assert params["embeddings"]["combine"]["kernel"].shape == (64, 32)
    assert model.apply({"params": params}, ids).shape == (2, 8, 101)


def test_out_of_range_ids_are_refused_eagerly_and_never_silent_under_jit():
    """Issue 17: token_type_ids >= type_vocab_size became a zero vector (one-hot
    lookup) and word ids >= vocab_size gave NaN, with no error; HF raises. Eager calls
    raise a ValueError naming the field; under jit the output is NaN (never a plausible
    answer) and `checkify.index_checks` names the bad index."""
    from jax.experimental import checkify
    bert_cfg = get_config("bert-tiny", **TINY)
    bert = BertForPreTraining(bert_cfg)
    ids, types = _tokens(11, (2, 8)), jnp.zeros((2, 8), jnp.int32)
    params = bert.init(jax.random.PRNGKey(0), ids)
    bad_types = types.at[1, 3].set(bert_cfg.type_vocab_size)
    with pytest.raises(ValueError, match=r"token_type_ids must be in \[0, 2\) \(type_vocab_size=2\); "
                                         r"got 2 at index \(1, 3\)"):
        bert.apply(params, ids, bad_types)
    for bad in (101, -1):
        with pytest.raises(ValueError, match=rf"input_ids must be in \[0, 101\) \(vocab_size=101\); got {bad}"):
            bert.apply(params, ids.at[0, 2].set(bad), types)
    with pytest.raises(ValueError, match=r"mlm_positions must be in \[0, 8\)"):
        bert.apply(params, ids, types, mlm_positions=jnp.array([[0, 8]] * 2))
    gpt = GPT(get_config("gpt-tiny", **TINY))
    gpt_params = gpt.init(jax.random.PRNGKey(0), ids)
    with pytest.raises(ValueError, match=r"input_ids must be in \[0, 101\)"):
        gpt.apply(gpt_params, ids.at[1, 7].set(500))
    seq2seq = EncoderDecoder(get_config("transformer-tiny", **TINY))
    s2s_params = seq2seq.init(jax.random.PRNGKey(0), ids, ids)
    with pytest.raises(ValueError, match=r"input_ids must be in \[0, 101\)"):
        seq2seq.apply(s2s_params, ids, ids.at[0, 0].set(101))

    jitted = jax.jit(lambda i, t: bert.apply(params, i, t)["mlm_logits"])
    assert np.isfinite(np.asarray(jitted(ids, types))).all()
    assert np.isnan(np.asarray(jitted(ids, bad_types))[1]).all()   # was finite: a zero segment
    assert np.isnan(np.asarray(jitted(ids.at[0, 2].set(-1), types))[0]).all()  # was row -1
    err, _ = checkify.checkify(jitted, errors=checkify.index_checks)(ids, bad_types)
    assert "index 2 is out of bounds for axis 0 with size 2" in str(err.get())
    err, _ = checkify.checkify(jitted, errors=checkify.index_checks)(ids, types)
    assert err.get() is None


def _log_softmax64(logits):
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("tie,chunk", [(True, 0), (False, 5)])
def test_gpt_methods_share_one_tree_and_token_stats_match_numpy(tie, chunk):
    """Initialising through any method gives the same parameters; `hidden` feeds the
    output matrix to give `logits` (= calling the model); `token_stats` (chunked with
    a chunk that does not divide B*L) is the float64 cross-entropy of those logits,
    also with dropout on (the training call: targets positional, rngs)."""
    model = GPT(get_config("gpt-tiny", **TINY, tie_embeddings=tie, loss_chunk=chunk))
    ids, targets = _tokens(20, (2, 7)), _tokens(21, (2, 7))
    mask = jnp.arange(7)[None] < jnp.array([[7], [4]])
    inputs = {"hidden": (ids,), "logits": (ids,), "token_stats": (ids, targets)}
    params = model.init(jax.random.PRNGKey(0), ids)["params"]
    for method, args in inputs.items():
        tree = model.init(jax.random.PRNGKey(0), *args, method=method)["params"]
        jax.tree.map(np.testing.assert_array_equal, tree, params)   # same names, shapes, values
    v = {"params": params}
    logits = model.apply(v, ids, attention_mask=mask, method="logits")
    np.testing.assert_array_equal(logits, model.apply(v, ids, attention_mask=mask))
    hidden = np.asarray(model.apply(v, ids, attention_mask=mask, method="hidden"), np.float64)
    head = (params["embeddings"]["token"]["embedding"][:101].T if tie else
            params["lm_head"]["kernel"])
    np.testing.assert_allclose(hidden @ np.asarray(head, np.float64), logits, atol=1e-4)
    if not tie:   # hidden states need no output matrix
        without = {k: p for k, p in params.items() if k != "lm_head"}
        np.testing.assert_array_equal(model.apply({"params": without}, ids, method="hidden"),
                                      model.apply(v, ids, method="hidden"))
    rngs = {"dropout": jax.random.PRNGKey(3)}
    for kw in (dict(), dict(deterministic=False, rngs=rngs)):
        logits = model.apply(v, ids, attention_mask=mask, method="logits", **kw)
        stats = model.apply(v, ids, targets, attention_mask=mask, method="token_stats", **kw)
        log_p = _log_softmax64(logits)
        nll = -np.take_along_axis(log_p, np.asarray(targets)[..., None], -1)[..., 0]
        np.testing.assert_allclose(stats["nll"], nll, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats["loss"], nll, rtol=1e-5, atol=1e-5)  # no smoothing
        np.testing.assert_array_equal(stats["correct"], log_p.argmax(-1) == np.asarray(targets))


def test_gpt_old_call_kwargs_warn_and_equal_the_methods():
    model = GPT(get_config("gpt-tiny", **TINY, tie_embeddings=False, loss_chunk=4))
    ids, targets = _tokens(22, (2, 6)), _tokens(23, (2, 6))
    v = model.init(jax.random.PRNGKey(0), ids)
    with pytest.warns(DeprecationWarning, match=r"return_hidden=True.*method='hidden'"):
        old = model.apply(v, ids, return_hidden=True)
    np.testing.assert_array_equal(old, model.apply(v, ids, method="hidden"))
    with pytest.warns(DeprecationWarning, match=r"targets=.*method='token_stats'"):
        old = model.apply(v, ids, targets=targets)
    jax.tree.map(np.testing.assert_array_equal, old,
                 model.apply(v, ids, targets, method="token_stats"))


def test_decoding_past_the_cache_is_an_error_eagerly_and_nan_under_jit():
    """dynamic_update_slice clamps its start: a step past the cache's end overwrote the
    last slot and returned plausible logits (max |diff| 1.9 from the full pass)."""
    model = GPT(get_config("gpt-tiny", **TINY))
    ids = _tokens(30, (2, 7))
    params = model.init(jax.random.PRNGKey(0), ids)["params"]
    _, state = model.apply({"params": params, "cache": init_cache(model, 2, 6)}, ids[:, :6],
                           decode=True, mutable=["cache"])
    with pytest.raises(ValueError, match=r"at cache index 6 run past the cache of 6 slots.*"
                                         r"cache_len >= 7"):
        model.apply({"params": params, "cache": state["cache"]}, ids[:, 6:], decode=True,
                    mutable=["cache"])
    step = jax.jit(lambda c, x: model.apply({"params": params, "cache": c}, x, decode=True,
                                            mutable=["cache"])[0])
    assert np.isfinite(np.asarray(step(init_cache(model, 2, 6), ids[:, :6]))).all()
    assert np.isnan(np.asarray(step(state["cache"], ids[:, 6:]))).all()


@pytest.mark.parametrize("scan_layers", [False, True])
def test_cached_decoding_keeps_the_prompts_padding_mask(scan_layers):
    """A left-padded prompt prefilled with its attention_mask, then stepped without one:
    every later step still hides the padded slots, as the full masked pass does (the
    mask used to be broadcast over the cache: a shape error on prefill, the whole
    prefix hidden on a step)."""
    model = GPT(get_config("gpt-tiny", **TINY, scan_layers=scan_layers, position="rope"))
    ids = _tokens(31, (2, 8))
    mask = np.ones((2, 8), bool)
    mask[1, :3] = False
    params = model.init(jax.random.PRNGKey(0), ids)["params"]
    full = model.apply({"params": params}, ids, attention_mask=mask)
    step = jax.jit(lambda c, x, m: model.apply({"params": params, "cache": c}, x,
                                               attention_mask=m, decode=True, mutable=["cache"]))
    logits, state = step(init_cache(model, 2, 8), ids[:, :5], mask[:, :5])
    out = [logits]
    for t in range(5, 8):
        logits, state = step(state["cache"], ids[:, t:t + 1], None if t < 7 else mask[:, t:t + 1])
        out.append(logits)
    out = np.asarray(jnp.concatenate(out, 1))
    np.testing.assert_allclose(out[0], full[0], atol=1e-5)
    np.testing.assert_allclose(out[1, 3:], full[1, 3:], atol=1e-5)   # the real tokens
    seq2seq = EncoderDecoder(get_config("transformer-tiny", **TINY, scan_layers=scan_layers))
    v = seq2seq.init(jax.random.PRNGKey(0), ids, ids)
    memory = seq2seq.apply(v, ids, method="encode")
    full = seq2seq.apply(v, memory, ids, tgt_mask=mask, method="decode")
    dec = lambda c, t, m: seq2seq.apply({**v, "cache": c}, memory, t, tgt_mask=m, decode=True,
                                        method="decode", mutable=["cache"])
    logits, state = dec(init_decode_cache(seq2seq, 2, 8, 8), ids[:, :5], mask[:, :5])
    later, _ = dec(state["cache"], ids[:, 5:], None)
    out = np.asarray(jnp.concatenate([logits, later], 1))
    np.testing.assert_allclose(out[0], full[0], atol=1e-5)
    np.testing.assert_allclose(out[1, 3:], full[1, 3:], atol=1e-5)


def test_invalid_targets_and_mlm_positions_are_nan_never_a_wrapped_index():
    """Negative indices wrapped (take_along_axis): target -100 scored as class 1 and
    -1 as the last class, mlm_positions -1 read the last position, under jit."""
    model = GPT(get_config("gpt-tiny", **TINY))
    ids, targets = _tokens(32, (2, 6)), np.asarray(_tokens(33, (2, 6)))
    params = {"params": model.init(jax.random.PRNGKey(0), ids)["params"]}
    bad = targets.copy()
    bad[0, 1], bad[1, 2], bad[1, 5] = -100, -1, 101
    stats = model.apply(params, ids, bad, method="token_stats")
    good = model.apply(params, ids, targets, method="token_stats")
    nan = bad != targets
    assert np.isnan(np.asarray(stats["nll"])[nan]).all()
    np.testing.assert_array_equal(np.asarray(stats["nll"])[~nan], np.asarray(good["nll"])[~nan])
    assert not np.asarray(stats["correct"])[nan].any()
    bert = BertForPreTraining(get_config("bert-tiny", **TINY))
    v = bert.init(jax.random.PRNGKey(0), ids)
    mlm = jax.jit(lambda pos: bert.apply(v, ids, mlm_positions=pos)["mlm_logits"])
    logits = np.asarray(mlm(jnp.array([[0, -1], [5, 6]])))
    assert np.isnan(logits[0, 1]).all() and np.isnan(logits[1, 1]).all()
    np.testing.assert_array_equal(logits[0, 0], np.asarray(mlm(jnp.array([[0, 1]] * 2)))[0, 0])


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_labels=True), r"num_labels=True; must be an int >= 1"),
    (dict(num_labels=3, labels="abc"), r"labels='abc'; must be None or a tuple of label names"),
    (dict(num_labels=2, labels=("a", 2)), r"labels=\('a', 2\)"),
    (dict(classifier_dropout="0.1"), r"classifier_dropout='0.1' must be in \[0, 1\)"),
    (dict(classifier_dropout=1.0), r"classifier_dropout=1.0 must be in \[0, 1\)"),
])
def test_classifier_heads_name_a_bad_field(kwargs, match):
    cfg = get_config("bert-tiny", **TINY)
    for head in (BertForSequenceClassification, BertForTokenClassification):
        with pytest.raises(ValueError, match=rf"{head.__name__}: {match}"):
            head(cfg, **kwargs)
    head = BertForSequenceClassification(cfg, num_labels=np.int64(3), classifier_dropout=np.float32(0.25))
    assert type(head.num_labels) is int and head.classifier_dropout == 0.25
    assert head.init_with_output(jax.random.PRNGKey(0), _tokens(34, (1, 4)))[0].shape == (1, 3)


def test_generate_inside_jit_says_its_prompts_must_be_concrete():
    model = GPT(get_config("gpt-tiny", **TINY))
    ids = _tokens(35, (2, 4))
    params = model.init(jax.random.PRNGKey(0), ids)["params"]
    with pytest.raises(ValueError, match=r"prompts must be concrete token ids.*outside jit"):
        jax.jit(lambda p: generate(model, params, p, max_new_tokens=2).tokens)(ids)
