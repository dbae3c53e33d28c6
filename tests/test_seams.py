"""Seams between modules: what one module promises another (config checks the
models rely on, a parallel strategy usable as soon as it is made)."""
import dataclasses

import jax
import numpy as np
import pytest

from transformer_jax.models import get_config
from transformer_jax.parallel.strategy import make_strategy
from transformer_jax.training import create_train_state, make_optimizer, make_train_step


def test_bert_refuses_swiglu_which_its_mlm_head_cannot_apply():
    """The MLM head's transform is one dense layer and an activation: SwiGLU there
    used to become GELU silently. GPT's and the encoder-decoder's blocks take it."""
    with pytest.raises(ValueError, match=r"^activation='swiglu' is not valid for BERT, .*"
                                         r"choose one of 'gelu', 'gelu_tanh', 'relu'$"):
        get_config("bert-tiny", activation="swiglu")
    assert get_config("bert-tiny", activation="relu").activation == "relu"
    for name in ("gpt-tiny", "transformer-tiny"):
        assert get_config(name, activation="swiglu").activation == "swiglu"


TINY = dict(vocab_size=64, max_len=16, num_layers=1, d_model=32, num_heads=2, d_ff=64,
            dropout=0.0, attention_dropout=0.0)


def _lm_batch(seed=0, batch=4, length=16):
    tokens = np.random.default_rng(seed).integers(0, TINY["vocab_size"], (batch, length + 1))
    return {"input_ids": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
            "loss_mask": np.ones((batch, length), np.float32)}


def test_shard_strategy_steps_without_create_state_and_stays_unchanged():
    """A strategy made with (config, tx, task) has its shardings up front: its train step
    runs on a state it did not create (here from another optimizer() call, whose tx is
    another object) and equals the single-device step; create_state changes nothing."""
    config = get_config("gpt-tiny", **TINY)
    tx = make_optimizer(1e-2)
    strategy = make_strategy("shard", batch_size=4, config=config, tx=tx, task="lm")
    fields = {f.name: getattr(strategy, f.name) for f in dataclasses.fields(strategy)}
    key, batch = jax.random.PRNGKey(0), _lm_batch()
    state = create_train_state(config, make_optimizer(1e-2), key, task="lm")
    got, metrics = strategy.train_step("lm")(state, batch)
    want, ref = make_train_step("lm")(create_train_state(config, tx, key, task="lm"), batch)
    np.testing.assert_allclose(float(metrics["loss"]), float(ref["loss"]), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 got.params, want.params)
    strategy.create_state(config, tx, key, task="lm")
    assert all(getattr(strategy, name) is value for name, value in fields.items())
    with pytest.raises(dataclasses.FrozenInstanceError):
        strategy.shardings = None


def test_unbound_shard_strategy_says_how_to_bind():
    strategy = make_strategy("shard")
    for make in (strategy.train_step, strategy.eval_step):
        with pytest.raises(ValueError, match=r"strategy\.bind\(config, tx, task=\.\.\.\)"):
            make("lm")
    assert make_strategy("none").bind(get_config("gpt-tiny", **TINY), make_optimizer(1e-2),
                                      task="lm") == make_strategy("none")
