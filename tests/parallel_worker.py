"""Runs the parallel checks in a process of its own, with fake CPU devices, and
writes the measurements as JSON for tests/test_parallel.py to judge.

    python tests/parallel_worker.py devices OUT.json TASK
        8 devices, TASK lm (tiny GPT) or mlm (tiny BERT): the single-device
        reference run; the pmap step; the sharded step for each mesh of MESHES;
        the parameters' shardings; checkpoints of the replicated state and, for
        lm, one saved under one mesh and restored under another.
    python tests/parallel_worker.py multihost OUT.json PROCESS_ID NUM_PROCESSES PORT
        one of NUM_PROCESSES processes x 2 devices on 127.0.0.1: the sharded
        GPT run over data=2,fsdp=2, each process building only its rows.

The device count must be fixed before JAX starts, so the caller sets XLA_FLAGS.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np

STEPS = 3
BATCH = 8
SEQ = 16
PREDICTIONS = 4          # MLM positions per row
MESHES = ("data=8", "fsdp=8", "data=2,fsdp=2,tensor=2", "tensor=2")  # tensor=2: on 2 of the 8
FULL_MESH = "data=2,fsdp=2,tensor=2"   # also initialised sharded, saved, restored elsewhere
TINY = dict(num_layers=1, d_model=32, num_heads=4, d_ff=64, vocab_size=128, max_len=SEQ,
            dropout=0.0, attention_dropout=0.0)


def _random_rows(rng, shape, count):
    """0/1 float rows with exactly `count` ones each, at random places: every device's
    slice then holds the same number of targets (see parallel/pmap.py)."""
    w = np.zeros(shape, np.float32)
    for row in w:
        row[rng.permutation(shape[-1])[:count]] = 1.0
    return w


def make_dataset(task: str):
    from transformer_jax.data import ExampleDataset, example_rng

    class RandomDataset(ExampleDataset):
        """Random token rows, a pure function of (seed, index) like the real datasets."""
        model_vocab_size = TINY["vocab_size"]
        fields = (("input_ids", "targets", "loss_mask") if task == "lm" else
                  ("input_ids", "token_type_ids", "attention_mask", "mlm_positions", "mlm_ids",
                   "mlm_weights", "nsp_labels"))

        def example(self, index, seed=0):
            rng = example_rng(seed, index)
            ids = lambda *shape: rng.integers(0, self.model_vocab_size, shape, dtype=np.int32)
            if task == "lm":
                return {"input_ids": ids(SEQ), "targets": ids(SEQ),
                        "loss_mask": _random_rows(rng, (1, SEQ), 3 * SEQ // 4)[0]}
            length = int(rng.integers(SEQ // 2, SEQ + 1))
            split = int(rng.integers(1, length))
            return {"input_ids": ids(SEQ),
                    "token_type_ids": (np.arange(SEQ) >= split).astype(np.int32),
                    "attention_mask": np.arange(SEQ) < length,
                    "mlm_positions": rng.integers(0, length, PREDICTIONS).astype(np.int32),
                    "mlm_ids": ids(PREDICTIONS),
                    "mlm_weights": _random_rows(rng, (1, PREDICTIONS), PREDICTIONS - 1)[0],
                    "nsp_labels": np.int32(rng.integers(0, 2))}
    return RandomDataset()


def setup(task: str):
    import jax
    from transformer_jax.models import get_config
    from transformer_jax.training import make_optimizer
    config = get_config("gpt-tiny" if task == "lm" else "bert-tiny", **TINY)
    # eps 1e-6, not 1e-8: the key bias's gradient is zero in exact arithmetic (softmax
    # ignores a shift shared by all keys), and Adam would blow its ~1e-10 rounding
    # noise, which differs with the reduction order, up to lr-sized steps.
    tx = make_optimizer(1e-3, weight_decay=0.01, eps=1e-6)
    return config, tx, jax.random.PRNGKey(7), make_dataset(task)


def _host(tree):
    import jax
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float64), tree)


def max_diff(a, b) -> float:
    """Largest absolute difference over all leaves of two like-shaped trees."""
    import jax
    diffs = jax.tree.map(lambda x, y: np.max(np.abs(x - y), initial=0.0), _host(a), _host(b))
    return float(max(jax.tree.leaves(diffs)))


def reference(task):
    """Single-device run: (initial params, {"loss", "grad_norm"} per step, final params)."""
    import jax
    from transformer_jax.training import create_train_state, make_train_step
    config, tx, key, ds = setup(task)
    device = jax.devices()[0]
    state = jax.device_put(create_train_state(config, tx, key, task=task), device)
    init = _host(state.params)
    step = make_train_step(task)
    history = {"loss": [], "grad_norm": []}
    for i in range(STEPS):
        state, metrics = step(state, jax.device_put(ds.batch(i, BATCH), device))
        _record(history, metrics)
    return init, history, _host(state.params)


def _record(history, metrics):
    for k in history:
        history[k].append(float(metrics[k]))


def _compare(history, ref) -> dict:
    """Largest absolute loss difference and relative grad-norm difference (Adam is
    blind to a gradient's scale, so a sum in place of a mean shows only there)."""
    return {"loss_diff": float(np.max(np.abs(np.subtract(history["loss"], ref["loss"])))),
            "grad_norm_rel_diff": float(np.max(np.abs(np.subtract(history["grad_norm"],
                                                                   ref["grad_norm"]))
                                               / np.abs(ref["grad_norm"])))}


def run_pmap(task, ref, ref_params, ckpt_dir):
    """The pmap step on all devices; then a checkpoint of the replicated state."""
    import jax
    from transformer_jax import parallel
    from transformer_jax.training import Checkpointer, abstract_train_state, create_train_state
    config, tx, key, ds = setup(task)
    state = parallel.replicate(create_train_state(config, tx, key, task=task))
    # detailed: the per-layer norms too (the global norm then comes from their groups).
    step = parallel.make_pmap_train_step(task, detailed=True)
    history = {"loss": [], "grad_norm": []}
    for i in range(STEPS):
        state, metrics = step(state, parallel.split_batch(ds.batch(i, BATCH)))
        _record(history, parallel.unreplicate(metrics))
    layer_norms = sum(k.startswith("grad_norm/") for k in metrics)
    params = parallel.unreplicate(state.params)
    last_copy = jax.tree.map(lambda x: x.addressable_shards[-1].data[0], state.params)
    with Checkpointer(ckpt_dir) as ckpt:
        parallel.save_replicated(ckpt, state, config=config)
        restored, _ = parallel.restore_replicated(
            ckpt, abstract_train_state(config, tx, task=task), config=config)
    return {"devices": int(jax.tree.leaves(state.params)[0].shape[0]), **_compare(history, ref),
            "layer_norms": layer_norms,
            "param_diff": max_diff(params, ref_params), "replicas_diff": max_diff(last_copy, params),
            "restored_diff": max_diff(parallel.unreplicate(restored.params), params),
            "restored_leading_dims": sorted({x.shape[0] for x in jax.tree.leaves(restored.params)})}


def logical_specs(config, task):
    """Tree (like the params) of logical PartitionSpecs, read from an abstract init
    with `logical_partitioning` on; unnamed parameters (norms) get PartitionSpec()."""
    import flax.linen as nn
    import jax
    from transformer_jax.training.tasks import TASKS
    boxed, spec = config.replace(logical_partitioning=True), TASKS[task]
    batch, model = spec.example_batch(boxed, 1, boxed.max_len), spec.build_model(boxed)
    init = lambda key: spec.apply(model.init, key, batch, deterministic=True)
    return nn.get_partition_spec(jax.eval_shape(init, jax.random.PRNGKey(0))["params"])


def sharding_record(state, specs) -> dict:
    """path -> [mesh spec, logical spec, shape of device 0's shard, global shape]."""
    import flax.traverse_util as tu
    params = tu.flatten_dict(state.params, sep="/")
    logical = tu.flatten_dict(specs, sep="/")
    spec = lambda s: [list(a) if isinstance(a, tuple) else a for a in s]
    record = {k: [spec(v.sharding.spec), spec(logical[k]), list(v.addressable_shards[0].data.shape),
                  list(v.shape)] for k, v in params.items()}
    adam_mu = tu.flatten_dict(state.opt_state[1][0].mu, sep="/")   # chain(clip, adamw)
    for k, v in adam_mu.items():
        record["adam_mu/" + k] = [spec(v.sharding.spec), spec(logical[k]),
                                  list(v.addressable_shards[0].data.shape), list(v.shape)]
    return record


def run_sharded(task, mesh_text, ref_init, ref, ref_params, *, sharded_init: bool):
    """The sharded step on `mesh_text`. With `sharded_init` the state is created sharded
    (and compared with the single-device init); otherwise the reference's initial state
    is placed onto the mesh, which saves a compilation."""
    import jax
    from transformer_jax import parallel
    from transformer_jax.training import create_train_state
    config, tx, key, ds = setup(task)
    mesh_config = parallel.MeshConfig.parse(mesh_text)
    mesh = mesh_config.make_mesh(jax.devices()[:mesh_config.size])
    if sharded_init:
        state, shardings = parallel.create_sharded_state(config, tx, key, mesh, task=task)
    else:
        _, shardings = parallel.abstract_sharded_state(config, tx, mesh, task=task)
        state = jax.device_put(create_train_state(config, tx, key, task=task), shardings)
    rec = {"init_diff": max_diff(state.params, ref_init) if sharded_init else None,
           "shardings": sharding_record(state, logical_specs(config, task))}
    step = parallel.make_sharded_train_step(task, mesh, shardings, detailed=True)
    history = {"loss": [], "grad_norm": []}
    for i in range(STEPS):
        state, metrics = step(state, ds.batch(i, BATCH))
        _record(history, metrics)
    rec.update(**_compare(history, ref), param_diff=max_diff(state.params, ref_params),
               layer_norms=sum(k.startswith("grad_norm/") for k in metrics))
    return state, rec


def run_restore_other_mesh(task, state, ckpt_dir, mesh_text):
    """Save the sharded `state`; restore it onto a mesh of another shape."""
    from transformer_jax import parallel
    from transformer_jax.training import Checkpointer
    config, tx, _, _ = setup(task)
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(int(state.step), state, config=config)
        mesh = parallel.MeshConfig.parse(mesh_text).make_mesh()
        target, _ = parallel.abstract_sharded_state(config, tx, mesh, task=task)
        restored, _ = ckpt.restore(target, config=config)
    kernel = restored.params["embeddings"]["token"]["embedding"]
    return {"saved_mesh": dict(state.params["embeddings"]["token"]["embedding"].sharding.mesh.shape),
            "restored_mesh": dict(kernel.sharding.mesh.shape),
            "token_spec": [a for a in kernel.sharding.spec],
            "token_shard": list(kernel.addressable_shards[0].data.shape),
            "param_diff": max_diff(restored.params, state.params),
            "opt_diff": max_diff(restored.opt_state, state.opt_state), "step": int(restored.step)}


def devices_main(out_path, task):
    import jax
    with tempfile.TemporaryDirectory() as tmp:
        init, ref, ref_params = reference(task)
        rec = {"device_count": jax.device_count(), "ref_losses": ref["loss"],
               "ref_grad_norms": ref["grad_norm"], "sharded": {},
               "pmap": run_pmap(task, ref, ref_params, os.path.join(tmp, "pmap"))}
        from transformer_jax.parallel import make_strategy
        auto = make_strategy("auto", batch_size=16)
        rec["auto"] = {"mode": auto.mode, "data": auto.mesh_config.data,
                       "uneven_batch": make_strategy("auto", batch_size=12).mode,
                       "with_mesh": make_strategy("auto", "fsdp=8").mesh_config.fsdp}
        for mesh_text in MESHES:
            state, rec["sharded"][mesh_text] = run_sharded(
                task, mesh_text, init, ref, ref_params, sharded_init=mesh_text == FULL_MESH)
            if task == "lm" and mesh_text == FULL_MESH:
                rec["restore"] = run_restore_other_mesh(task, state, os.path.join(tmp, "mesh"),
                                                        "fsdp=4,tensor=2")
    with open(out_path, "w") as f:
        json.dump(rec, f)


def multihost_main(out_path, process_id, num_processes, port):
    from transformer_jax import parallel
    env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(num_processes),
           "JAX_PROCESS_ID": str(process_id)}
    assert parallel.initialize_from_env(env, timeout_s=60)
    import jax
    config, tx, key, ds = setup("lm")
    mesh = parallel.MeshConfig(data=2, fsdp=jax.device_count() // 2).make_mesh()
    state, shardings = parallel.create_sharded_state(config, tx, key, mesh, task="lm")
    step = parallel.make_sharded_train_step("lm", mesh, shardings)
    losses, rows = [], parallel.process_rows(mesh, BATCH)
    for i in range(STEPS):
        local = parallel.process_batch(ds, i, BATCH, mesh)
        state, metrics = step(state, local)
        losses.append(float(metrics["loss"]))
    with open(out_path, "w") as f:
        json.dump({"process_index": jax.process_index(), "process_count": jax.process_count(),
                   "device_count": jax.device_count(), "local_devices": jax.local_device_count(),
                   "rows": list(rows), "local_batch": int(local["input_ids"].shape[0]),
                   "losses": losses}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if sys.argv[1] == "devices":
        devices_main(sys.argv[2], sys.argv[3])
    else:
        multihost_main(sys.argv[2], *map(int, sys.argv[3:6]))
