"""jit + Mesh + NamedSharding: data, FSDP and tensor parallelism from logical names.

    eval_shape(init with boxed params) -> logical PartitionSpecs
        -> rules -> NamedShardings of params, then of the optimizer state
        -> jit(create_train_state, out_shardings=...)

so every device computes only its own slices of the parameters and moments;
the full model is never materialised on one device. The train step is the
single-device `train_step`, jitted with those shardings: XLA inserts the
gradient all-reduce (data), the parameter all-gathers and gradient
reduce-scatters (fsdp) and the head / MLP collectives (tensor). Activations carry
`nn.with_logical_constraint`s, active only inside `mesh_context`.

With `jax_threefry_partitionable` (the default) random numbers do not depend on
the sharding, so a sharded run starts from the same parameters as a
single-device run with the same seed.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import flax.traverse_util as traverse_util
import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from transformer_jax._compat import donate_argnums
from transformer_jax.config import TransformerConfig
from transformer_jax.parallel.mesh import BATCH_AXES, LOGICAL_RULES
from transformer_jax.training.state import TrainState, create_train_state
from transformer_jax.training.step import eval_step, train_step
from transformer_jax.training.tasks import Task, get_task, resolve


@contextlib.contextmanager
def mesh_context(mesh: jax.sharding.Mesh, rules=LOGICAL_RULES):
    """Mesh and logical rules in context: activation constraints (e.g. `[batch, seq,
    d_model]` -> (data x fsdp, None, None)) take effect while tracing.
    `jax.set_mesh` must be entered outside jit."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """A whole copy of the array on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis split over data x fsdp; other axes whole: `[B, ...]` ->
    `[B / (data * fsdp), ...]` per device."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def _abstract_boxed_params(config: TransformerConfig, task: str | None):
    boxed = config.replace(logical_partitioning=True)
    spec = resolve(task, config)
    # Shapes do not depend on the example; max_len satisfies kernels that check lengths.
    batch, model = spec.example_batch(boxed, 1, boxed.max_len), spec.build_model(boxed)
    return jax.eval_shape(lambda key: spec.apply(model.init, key, batch, deterministic=True),
                          jax.random.PRNGKey(0))["params"]


def _check_divisible(shapes, shardings) -> None:
    flat_shapes = traverse_util.flatten_dict(shapes, sep="/")
    flat_shardings = traverse_util.flatten_dict(shardings, sep="/")
    for path, shape in flat_shapes.items():
        sharding = flat_shardings[path]
        for dim, axes in zip(shape.shape, sharding.spec):
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            ways = int(np.prod([sharding.mesh.shape[a] for a in axes]))
            if dim % ways:
                raise ValueError(f"parameter {path} of shape {tuple(shape.shape)}: a dimension of "
                                 f"size {dim} is split over mesh axes {axes} ({ways} ways), which "
                                 f"does not divide it; change the mesh or the model size")


def param_shardings(config: TransformerConfig, mesh: jax.sharding.Mesh, rules=LOGICAL_RULES,
                    task: str | None = None):
    """Tree of NamedShardings for the parameters (e.g. an MLP kernel `[d_model, d_ff]`
    -> PartitionSpec('fsdp', 'tensor')); ValueError if a dimension does not divide
    over the mesh axes a rule assigns it to."""
    boxed = _abstract_boxed_params(config, task)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    _check_divisible(nn.unbox(boxed), shardings)
    return shardings


def state_shardings(abstract_state: TrainState, params_sharding, mesh: jax.sharding.Mesh):
    """TrainState of NamedShardings: the optimizer's per-parameter trees (Adam moments,
    accumulated gradients) follow their parameters; step, counters and rng are replicated."""
    rep = replicated(mesh)
    opt = optax.tree_map_params(abstract_state.tx, lambda _, s: s, abstract_state.opt_state,
                                params_sharding, transform_non_params=lambda _: rep)
    return abstract_state.replace(step=rep, params=params_sharding, opt_state=opt, rng=rep)


def _raw_key(rng) -> np.ndarray:
    # A host array is the same value on every process; a local device array is not global.
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return np.asarray(rng, np.uint32)


def abstract_sharded_state(config: TransformerConfig, tx: optax.GradientTransformation,
                           mesh: jax.sharding.Mesh, rules=LOGICAL_RULES, *, task: str | None = None,
                           lr_fn: Callable | None = None) -> tuple[TrainState, TrainState]:
    """(TrainState of `jax.ShapeDtypeStruct`s carrying their shardings, TrainState of the
    shardings) without allocating: a restore target that places a checkpoint onto
    `mesh`, whatever mesh it was saved from."""
    init = functools.partial(create_train_state, config, tx, task=task, lr_fn=lr_fn)
    abstract = jax.eval_shape(init, np.zeros(2, np.uint32))
    shardings = state_shardings(abstract, param_shardings(config, mesh, rules, task), mesh)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, shardings)
    return target, shardings


def create_sharded_state(config: TransformerConfig, tx: optax.GradientTransformation, rng,
                         mesh: jax.sharding.Mesh, rules=LOGICAL_RULES, *, task: str | None = None,
                         lr_fn: Callable | None = None) -> tuple[TrainState, TrainState]:
    """(state, its shardings): `create_train_state` run under jit with sharded outputs,
    so each device initialises only its own slices (a kernel `[d_model, d_ff]` is
    created as `[d_model / fsdp, d_ff / tensor]` shards)."""
    _, shardings = abstract_sharded_state(config, tx, mesh, rules, task=task, lr_fn=lr_fn)
    init = functools.partial(create_train_state, config, tx, task=task, lr_fn=lr_fn)
    with mesh_context(mesh, rules):
        state = jax.jit(init, in_shardings=replicated(mesh), out_shardings=shardings)(_raw_key(rng))
    return state, shardings


def place_batch(batch: Mapping[str, Any], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """This process's rows (numpy `[B_local, ...]`) -> global arrays `[B, ...]` split over
    data x fsdp. On one process the local rows are the whole batch; on several, each
    passes its own slice (`multihost.process_batch`)."""
    sharding = batch_sharding(mesh)
    return {k: v if isinstance(v, jax.Array) and v.sharding == sharding
            else jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


def _resolve(task: Task | str) -> Task:
    return get_task(task) if isinstance(task, str) else task


def _jit_per_structure(make: Callable[[TrainState], Callable], shardings: TrainState) -> Callable:
    """(state structure -> jitted step), made once per structure by `make(fitted
    shardings)`. A TrainState's static fields (tx, lr_fn, apply_fn) are part of its
    pytree structure and compared by identity, and jit needs its shardings to match
    that structure: shardings computed with another `optimizer()` call's tx would be
    refused. The NamedShardings are moved onto the state's structure instead."""
    leaves = jax.tree.leaves(shardings)

    @functools.lru_cache(maxsize=None)
    def jitted(structure):
        return make(jax.tree.unflatten(structure, leaves))
    return lambda state: jitted(jax.tree.structure(state))


def make_sharded_train_step(task: Task | str, mesh: jax.sharding.Mesh, shardings: TrainState,
                            rules=LOGICAL_RULES, *, donate: bool = True,
                            detailed: bool = False) -> Callable:
    """(state, batch) -> (state, metrics): `train_step` jitted over `mesh`. The batch may
    be this process's numpy rows `[B_local, ...]` or global arrays `[B, ...]` already
    placed; metrics (scalars) come back replicated. The state is donated."""
    fn = functools.partial(train_step, task=_resolve(task), detailed=detailed)
    step = _jit_per_structure(lambda fitted: jax.jit(
        fn, in_shardings=(fitted, batch_sharding(mesh)), out_shardings=(fitted, replicated(mesh)),
        donate_argnums=donate_argnums(0, donate=donate)), shardings)

    def run(state, batch):
        with mesh_context(mesh, rules):
            return step(state)(state, place_batch(batch, mesh))
    return run


def make_sharded_eval_step(task: Task | str, mesh: jax.sharding.Mesh, shardings: TrainState,
                           rules=LOGICAL_RULES) -> Callable:
    """(state, batch `[B_local, ...]` rows or placed `[B, ...]`) -> scalar metrics,
    without dropout, over `mesh`."""
    fn = functools.partial(eval_step, task=_resolve(task))
    step = _jit_per_structure(lambda fitted: jax.jit(
        fn, in_shardings=(fitted, batch_sharding(mesh)), out_shardings=replicated(mesh)), shardings)

    def run(state, batch):
        with mesh_context(mesh, rules):
            return step(state)(state, place_batch(batch, mesh))
    return run
