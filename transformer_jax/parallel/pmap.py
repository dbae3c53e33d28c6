"""Data parallelism with `jax.pmap`: one replica of the state per local device.

    batch [B, ...] --shard_batch--> [devices, B / devices, ...]
    each device: compute_grads on its slice -> lax.pmean(grads) -> apply_grads

Every replica applies the same averaged gradient, so the replicas stay equal.
The averaged gradient is the mean of per-device mean losses: it equals the
gradient of the global batch's loss when every device's slice holds the same
number of targets (fixed-length LM rows, a fixed number of MLM predictions);
otherwise devices with fewer targets weigh more. The jit/mesh path
(`sharding.py`) computes the global loss exactly.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from transformer_jax._compat import donate_argnums
from transformer_jax.data import shard_batch
from transformer_jax.training.checkpoint import Checkpointer
from transformer_jax.training.state import TrainState
from transformer_jax.training.step import apply_grads, compute_grads
from transformer_jax.training.tasks import Task, get_task

AXIS = "devices"


def replicate(tree, devices: Sequence[jax.Device] | None = None):
    """Each leaf `[...]` -> `[num_devices, ...]` with one copy per device (each copy
    is put on its device directly; no stacked copy is built on one device)."""
    devices = list(devices or jax.local_devices())
    mesh = jax.sharding.Mesh(np.array(devices), ("replica",))
    sharding = NamedSharding(mesh, PartitionSpec("replica"))

    def one(x):
        x = jnp.asarray(x)
        shards = [jax.device_put(x[None], d) for d in devices]
        return jax.make_array_from_single_device_arrays((len(devices), *x.shape), sharding, shards)
    return jax.tree.map(one, tree)


def unreplicate(tree):
    """Inverse of `replicate` (and of pmap outputs): each leaf `[num_devices, ...]` ->
    device 0's copy `[...]`."""
    return jax.tree.map(lambda x: x.addressable_shards[0].data[0], tree)


def pmap_train_step(state: TrainState, batch, task: Task, axis_name: str = AXIS,
                    detailed: bool = False):
    """Per-device body, run under pmap on this device's state and batch slice
    `[B / devices, ...]`: gradients and metrics averaged over `axis_name` between
    `compute_grads` and `apply_grads`. Dropout differs per device (key folded with
    the device index), as it would across the rows of one large batch."""
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    loss, metrics, grads = compute_grads(state.apply_fn, state.params, batch, rng, task)
    grads = jax.lax.pmean(grads, axis_name)
    loss = jax.lax.pmean(loss, axis_name)
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    weight = jax.lax.psum(metrics.pop("weight"), axis_name)  # target count of the global batch
    metrics = {**jax.lax.pmean(metrics, axis_name), "weight": weight}
    metrics["perplexity"] = jnp.exp(metrics["nll"])
    state, update_metrics = apply_grads(state, grads, loss, detailed=detailed)
    return state, {**metrics, **update_metrics}


def make_pmap_train_step(task: Task | str, *, axis_name: str = AXIS,
                         donate: bool = True, detailed: bool = False) -> Callable:
    """pmap(pmap_train_step): (replicated state, batch `[devices, B / devices, ...]`)
    -> (replicated state, metrics, one copy per device; `unreplicate` them)."""
    task = get_task(task) if isinstance(task, str) else task
    return jax.pmap(functools.partial(pmap_train_step, task=task, axis_name=axis_name,
                                      detailed=detailed),
                    axis_name=axis_name, donate_argnums=donate_argnums(0, donate=donate))


def split_batch(batch, num_devices: int | None = None):
    """Host batch `[B, ...]` -> `[devices, B / devices, ...]` (ValueError if B does not divide)."""
    return shard_batch(batch, num_devices or jax.local_device_count())


def save_replicated(ckpt: Checkpointer, state: TrainState, **kwargs) -> bool:
    """Checkpoint a replicated state (leaves `[devices, ...]`): device 0's copy, as an
    ordinary state."""
    host = unreplicate(state)
    return ckpt.save(int(host.step), host, **kwargs)


def restore_replicated(ckpt: Checkpointer, target: TrainState, **kwargs) -> tuple[TrainState, dict]:
    """Restore into an unreplicated `target`, then replicate (leaves `[devices, ...]`):
    (state, JSON record)."""
    state, record = ckpt.restore(target, **kwargs)
    return replicate(state), record

