"""The train state: step, fp32 master parameters, optimizer state and a dropout key.

`TrainState` extends Flax's with `rng` (raw uint32 key data, so checkpoints
and `jax.vmap` over seeds treat it as an ordinary array) and `lr_fn` (static:
micro-step -> learning rate, for logging). The dropout key of step s is
`fold_in(rng, s)`, so a resumed run draws the same masks as an uninterrupted one.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import flax.struct as struct
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from transformer_jax.config import TransformerConfig
from transformer_jax.training.tasks import Task, resolve


class TrainState(train_state.TrainState):
    """Flax's TrainState (step int32 `[]`, params, tx, opt_state) plus `rng`, the
    dropout key data uint32 `[2]`, and `lr_fn`, a static step -> learning rate."""
    rng: jax.Array                                 # uint32[2] dropout key data
    lr_fn: Callable[[Any], Any] | None = struct.field(pytree_node=False, default=None)


def _key_data(rng) -> jax.Array:
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    return jnp.asarray(rng, jnp.uint32)


def init_params(config: TransformerConfig, rng, *, task: Task | str | None = None,
                seq_len: int | None = None):
    """-> (fresh parameters of the model `task` trains (default: the family's
    `models.build(config)`) initialised from `rng`, the model).
    Parameter shapes follow the config, e.g. `[vocab, d_model]` token embeddings.

    Shapes do not depend on the example batch, but some attention kernels check
    sequence lengths at trace time, so the example uses max_len unless told."""
    model, init = _jitted_init(config, resolve(task, config), seq_len or config.max_len)
    # Plain arrays even when the config boxes parameters with logical axis names
    # (`logical_partitioning`); sharded set-ups read the names from an eval_shape'd init.
    return nn.meta.unbox(init(rng)["params"]), model


@functools.lru_cache(maxsize=16)
def _jitted_init(config: TransformerConfig, task: Task, seq_len: int):
    # Cached (by config and Task, both hashable) so that building several states of
    # one model compiles init once.
    batch = task.example_batch(config, 1, seq_len)
    model = task.build_model(config)
    return model, jax.jit(lambda key: task.apply(model.init, key, batch, deterministic=True))


def create_train_state(config: TransformerConfig, tx: optax.GradientTransformation, rng, *,
                       task: Task | str | None = None, lr_fn: Callable | None = None,
                       params: Any = None) -> TrainState:
    """Initialise a TrainState from a seed key (typed or raw), or around given `params`
    (e.g. imported weights): step int32 `[]`, rng uint32 `[2]`, and an optimizer state
    of the parameters' shapes. Parameters keep the config's param_dtype (float32 =
    master weights) even when `config.dtype` is bfloat16."""
    params_key, dropout_key = jax.random.split(rng)
    if params is None:
        params, model = init_params(config, params_key, task=task)
    else:  # the cached model, so that states of one config share jit compilations
        model, _ = _jitted_init(config, resolve(task, config), config.max_len)
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                              rng=_key_data(dropout_key), lr_fn=lr_fn)
    # An int32 array, not Python's 0, so the first and later steps share one compilation.
    return state.replace(step=jnp.zeros((), jnp.int32))


def abstract_train_state(config: TransformerConfig, tx: optax.GradientTransformation, *,
                         task: Task | str | None = None, lr_fn: Callable | None = None) -> TrainState:
    """The TrainState's shapes and dtypes (`jax.ShapeDtypeStruct` leaves, e.g. step
    int32 `[]`, rng uint32 `[2]`), without allocating: a restore target for checkpoints."""
    return jax.eval_shape(lambda key: create_train_state(config, tx, key, task=task, lr_fn=lr_fn),
                          jax.random.key(0))
