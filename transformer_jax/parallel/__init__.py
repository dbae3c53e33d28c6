"""Parallel and multi-host training.

  pmap.py       data parallelism with jax.pmap: replicated state, lax.pmean'd gradients
  mesh.py       MeshConfig (data x fsdp x tensor), parsing, validation, logical rules
  sharding.py   jit + Mesh + NamedSharding: sharded init, sharded train/eval steps
  multihost.py  jax.distributed start-up from the environment, per-process batches
  strategy.py   the three `--parallel` modes behind one interface, for the training loop

Typical sharded wiring:
    mesh = MeshConfig.parse("data=2,fsdp=2,tensor=2").make_mesh()
    state, shardings = create_sharded_state(config, tx, key, mesh, task="lm")
    step = make_sharded_train_step("lm", mesh, shardings)
    state, metrics = step(state, batch)     # batch: this process's numpy rows
"""
from transformer_jax.parallel.mesh import LOGICAL_RULES, MESH_AXES, MeshConfig
from transformer_jax.parallel.multihost import (distributed_env, initialize_from_env,
                                                process_batch, process_rows)
from transformer_jax.parallel.pmap import (make_pmap_train_step, replicate, restore_replicated,
                                           save_replicated, split_batch, unreplicate)
from transformer_jax.parallel.sharding import (abstract_sharded_state, batch_sharding,
                                               create_sharded_state, make_sharded_eval_step,
                                               make_sharded_train_step, mesh_context,
                                               param_shardings, place_batch, state_shardings)
from transformer_jax.parallel.strategy import PARALLEL_MODES, Strategy, make_strategy

__all__ = [
    "LOGICAL_RULES", "MESH_AXES", "PARALLEL_MODES", "MeshConfig", "Strategy",
    "abstract_sharded_state", "batch_sharding", "create_sharded_state", "distributed_env",
    "initialize_from_env", "make_pmap_train_step",
    "make_sharded_eval_step", "make_sharded_train_step", "make_strategy", "mesh_context",
    "param_shardings", "place_batch", "process_batch", "process_rows", "replicate",
    "restore_replicated", "save_replicated", "split_batch", "state_shardings", "unreplicate",
]
