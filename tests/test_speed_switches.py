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
