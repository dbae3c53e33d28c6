"""The `--parallel` modes behind one interface, so the training loop stays one loop.

  none   one device: `make_train_step` as is
  pmap   state replicated on every local device, batch split per device
  shard  state sharded over a data x fsdp x tensor mesh, batch split over data x fsdp
  auto   `shard` with data=<all devices> when there are several devices (and the
         batch splits over them), else `none`: jit + NamedSharding is the default,
         pmap (a `jit(shard_map)` in maintenance mode since JAX 0.8) only on request

The loop keeps `state` in the strategy's placement; `host_state(state)` is what
evaluation and checkpoints see (the replicas collapsed to one for pmap, the
sharded arrays themselves for shard, which Orbax saves shard by shard).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax

from transformer_jax.parallel import pmap as pmap_lib, sharding as sharding_lib
from transformer_jax.parallel.mesh import PARALLEL_MODES, MeshConfig
from transformer_jax.training.state import create_train_state
from transformer_jax.training.step import make_eval_step, make_train_step


@dataclasses.dataclass(frozen=True)
class Strategy:
    """One `--parallel` mode: how the state is created and placed, and the train and
    eval steps that take host batches `[B, ...]`. Frozen: `shard`'s state shardings are
    computed up front (`bind`, or `make_strategy(..., tx=, task=)`), not by `create_state`."""
    mode: str = "none"
    mesh_config: MeshConfig | None = None   # shard only
    mesh: jax.sharding.Mesh | None = None
    shardings: object = None                # shard: TrainState of NamedShardings, from `bind`

    def bind(self, config, tx, *, task: str, lr_fn=None) -> "Strategy":
        """This strategy with the shardings of the train state of (config, tx, task),
        read from an abstract init (nothing allocated); `shard`'s steps need them.
        The other modes need none: self."""
        if self.mode != "shard":
            return self
        self.mesh_config.validate(jax.device_count(), config)
        _, shardings = sharding_lib.abstract_sharded_state(
            config, tx, self.mesh, self.mesh_config.rules, task=task, lr_fn=lr_fn)
        return dataclasses.replace(self, shardings=shardings)

    def create_state(self, config, tx, rng, *, task: str, lr_fn=None):
        """A fresh state; sharded at creation for `shard` (never whole on one device)."""
        if self.mode != "shard":
            return create_train_state(config, tx, rng, task=task, lr_fn=lr_fn)
        self.mesh_config.validate(jax.device_count(), config)
        state, _ = sharding_lib.create_sharded_state(
            config, tx, rng, self.mesh, self.mesh_config.rules, task=task, lr_fn=lr_fn)
        return state

    def place_state(self, state):
        """Host/checkpoint placement -> training placement (pmap: leaves `[...]` ->
        `[devices, ...]`)."""
        return pmap_lib.replicate(state) if self.mode == "pmap" else state

    def host_state(self, state):
        """Training placement -> the state evaluation and checkpoints take (pmap:
        leaves `[devices, ...]` -> device 0's `[...]`)."""
        return pmap_lib.unreplicate(state) if self.mode == "pmap" else state

    def train_step(self, task, *, detailed: bool = False) -> Callable:
        """(placed state, host batch [B, ...]) -> (placed state, one copy of the metrics);
        `detailed` adds per-layer gradient and update norms (`apply_grads`)."""
        if self.mode == "none":
            return make_train_step(task, detailed=detailed)
        if self.mode == "shard":
            return sharding_lib.make_sharded_train_step(task, self.mesh, self._shardings(),
                                                        self.mesh_config.rules, detailed=detailed)
        step = pmap_lib.make_pmap_train_step(task, detailed=detailed)

        def run(state, batch):
            state, metrics = step(state, pmap_lib.split_batch(batch))
            return state, pmap_lib.unreplicate(metrics)
        return run

    def eval_step(self, task) -> Callable:
        """(host state, host batch `[B, ...]`) -> scalar metrics."""
        if self.mode == "shard":
            return sharding_lib.make_sharded_eval_step(task, self.mesh, self._shardings(),
                                                       self.mesh_config.rules)
        return make_eval_step(task)

    def _shardings(self):
        if self.shardings is None:
            raise ValueError("parallel='shard' steps need the train state's shardings: build the "
                             "strategy with make_strategy(..., config=, tx=, task=) or call "
                             "strategy.bind(config, tx, task=...) first")
        return self.shardings


def resolve_mode(mode: str, batch_size: int | None = None, mesh=None) -> str:
    """The mode "auto" stands for on this machine (other modes: themselves); with a
    mesh spec, "shard"."""
    if mode != "auto":
        return mode
    if mesh is not None:
        return "shard"
    n = jax.device_count()
    return "shard" if n > 1 and (batch_size is None or batch_size % n == 0) else "none"


def make_strategy(mode: str = "auto", mesh: str | MeshConfig | None = None, *,
                  batch_size: int | None = None, config=None, tx=None, task: str | None = None,
                  lr_fn=None) -> Strategy:
    """Validated strategy for `--parallel mode --mesh spec` on this machine's devices;
    with `config` (a TransformerConfig) and `batch_size` they are checked to fit too.
    With `config`, `tx` and `task` too it is bound (`Strategy.bind`): its steps are ready.
    A shard run without a mesh spreads the batch over all devices (data=N); "auto"
    is resolved first (`resolve_mode`), so `Strategy.mode` is never "auto"."""
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel={mode!r} is not valid; choose one of {', '.join(PARALLEL_MODES)}")
    mode = resolve_mode(mode, batch_size, mesh)
    if mode != "shard":
        if mesh is not None:
            raise ValueError(f"mesh={str(mesh)!r} is only used with parallel='shard', not {mode!r}")
        if mode == "pmap" and batch_size is not None and batch_size % jax.local_device_count():
            raise ValueError(f"batch_size={batch_size} is not divisible by the "
                             f"{jax.local_device_count()} local devices that pmap splits it over")
        return Strategy(mode)
    if tx is not None and (config is None or task is None):
        raise ValueError("make_strategy(tx=...) also needs config= and task= to compute the "
                         "state's shardings")
    mesh_config = mesh if isinstance(mesh, MeshConfig) else (
        MeshConfig.parse(mesh) if mesh else MeshConfig(data=jax.device_count()))
    mesh_config.validate(jax.device_count(), config, batch_size)
    strategy = Strategy(mode, mesh_config, mesh_config.make_mesh())
    return strategy if tx is None else strategy.bind(config, tx, task=task, lr_fn=lr_fn)
