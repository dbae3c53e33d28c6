"""Parallel training against the single-device step.

The multi-device checks run in processes of their own (tests/parallel_worker.py)
with fake CPU devices, so this process keeps its one device:
  * 8 devices: pmap and the sharded step (data=8, fsdp=8, data=2,fsdp=2,tensor=2,
    tensor=2) on tiny BERT and GPT equal the single-device step after 3 steps;
    parameters and Adam moments are sharded as the rules say; a checkpoint saved
    under one mesh restores under another.
  * 2 processes x 2 devices on 127.0.0.1 give the single-device losses.
The rest runs here: mesh parsing and errors, boxes and constraints that stay
out of plain code, the command-line flags.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import parallel
from transformer_jax.models import build, get_config
from transformer_jax.parallel import MeshConfig
from xla_flags import FAST_COMPILE

WORKER = Path(__file__).with_name("parallel_worker.py")
TOL = 1e-5
MESHES = ("data=8", "fsdp=8", "data=2,fsdp=2,tensor=2", "tensor=2")
# The reference reading of the rules: logical name -> mesh axis.
EXPECTED_AXIS = {"embed": "fsdp", "heads": "tensor", "mlp": "tensor", "kv": None, "vocab": None,
                 None: None}
TINY = dict(num_layers=1, d_model=32, num_heads=4, d_ff=64, vocab_size=128, max_len=16,
            dropout=0.0, attention_dropout=0.0)


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    repo = str(Path(__file__).resolve().parents[1])
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")])),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}")
    return env


def _start(args, devices: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], env=_env(devices),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait(procs, timeout: int) -> None:
    """Waits for every worker; kills all on a timeout; fails with a worker's stderr."""
    try:
        errors = [p.communicate(timeout=timeout)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, err in zip(procs, errors):
        assert p.returncode == 0, f"{' '.join(p.args[1:])} failed:\n{err[-4000:]}"


@contextlib.contextmanager
def _shared_once(tmp_path_factory, name: str):
    """A path computed once per test session, also under pytest-xdist (whose workers
    share the parent of their base temp dirs): the first worker computes, others wait."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        yield tmp_path_factory.mktemp(name) / "out.json"
        return
    root = tmp_path_factory.getbasetemp().parent
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield root / f"{name}.json"
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def device_results(tmp_path_factory):
    """{"lm": ..., "mlm": ...}: the two models' checks, run side by side (2 cores)."""
    with _shared_once(tmp_path_factory, "parallel_devices") as path:
        if not path.exists():
            parts = {task: path.with_name(f"{path.stem}-{task}.json") for task in ("lm", "mlm")}
            _wait([_start(["devices", out, task], devices=8) for task, out in parts.items()],
                  timeout=480)
            path.write_text(json.dumps({t: json.loads(p.read_text()) for t, p in parts.items()}))
        return json.loads(path.read_text())


# ---- 8 fake devices ---------------------------------------------------------------

def test_pmap_step_equals_single_device_step(device_results):
    for task in ("lm", "mlm"):
        r = device_results[task]["pmap"]
        assert device_results[task]["device_count"] == 8 and r["devices"] == 8
        assert r["loss_diff"] < TOL and r["grad_norm_rel_diff"] < TOL, (task, r)
        assert r["param_diff"] < TOL, (task, r)
        assert r["replicas_diff"] == 0.0, (task, r)   # every device applied the same update
        assert r["layer_norms"] >= 2, (task, r)        # detailed=True: per-layer norms too


def test_auto_is_sharded_jit_on_several_devices(device_results):
    """The default --parallel auto: jit + NamedSharding over all 8 devices (data=8), one
    device when the batch does not split evenly; a mesh spec means shard; on this
    process's single device, none."""
    for task in ("lm", "mlm"):
        assert device_results[task]["auto"] == {"mode": "shard", "data": 8,
                                                "uneven_batch": "none", "with_mesh": 8}
    assert jax.device_count() == 1 and parallel.make_strategy("auto").mode == "none"
    assert parallel.make_strategy().mode == "none"   # auto is the default


def test_replicated_state_checkpoints_round_trip(device_results):
    for task in ("lm", "mlm"):
        r = device_results[task]["pmap"]
        assert r["restored_diff"] == 0.0 and r["restored_leading_dims"] == [8], (task, r)


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("task", ["lm", "mlm"])
def test_sharded_step_equals_single_device_step(device_results, task, mesh):
    rec = device_results[task]
    r = rec["sharded"][mesh]
    assert r["loss_diff"] < TOL and r["grad_norm_rel_diff"] < TOL, r
    assert r["param_diff"] < TOL, r["param_diff"]
    assert r["layer_norms"] >= 2, r
    assert np.all(np.diff(rec["ref_losses"]) != 0)   # the steps did change the model
    if mesh == "data=2,fsdp=2,tensor=2":   # created sharded: the same init as one device
        assert r["init_diff"] == 0.0


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("task", ["lm", "mlm"])
def test_parameters_are_sharded_as_the_rules_say(device_results, task, mesh):
    sizes = MeshConfig.parse(mesh)
    shardings = device_results[task]["sharded"][mesh]["shardings"]
    for path, (spec, logical, shard, shape) in shardings.items():
        expected = [EXPECTED_AXIS[name] for name in logical]
        assert spec[:len(expected)] == expected[:len(spec)] and not any(spec[len(expected):]), \
            (path, spec, logical)
        ways = [getattr(sizes, a) if a else 1 for a in expected] + [1] * (len(shape) - len(expected))
        assert shard == [d // w for d, w in zip(shape, ways)], (path, shard, shape, spec)
    layer = "decoder/layer_0/self_attention" if task == "lm" else \
        "bert/encoder/layer_0/attention"
    mlp = layer.rsplit("/", 1)[0] + "/mlp"
    assert shardings[f"{layer}/query/kernel"][1] == ["embed", "heads", "kv"]
    assert shardings[f"{layer}/out/kernel"][1] == ["heads", "kv", "embed"]
    assert shardings[f"{mlp}/up/kernel"][1] == ["embed", "mlp"]
    # What each device holds (d_model 32, 4 heads of 8, d_ff 64):
    held = {"data=8": ([32, 4, 8], [32, 64]), "fsdp=8": ([4, 4, 8], [4, 64]),
            "data=2,fsdp=2,tensor=2": ([16, 2, 8], [16, 32]), "tensor=2": ([32, 2, 8], [32, 32])}
    assert (shardings[f"{layer}/query/kernel"][2], shardings[f"{mlp}/up/kernel"][2]) == held[mesh]
    # Adam's first moment is sharded like its parameter (FSDP shards optimizer state).
    assert shardings[f"adam_mu/{mlp}/up/kernel"][2] == held[mesh][1]


def test_checkpoint_restores_under_another_mesh(device_results):
    r = device_results["lm"]["restore"]
    assert r["saved_mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert r["restored_mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    assert r["token_spec"] == [None, "fsdp"] and r["token_shard"] == [128, 8]
    assert r["param_diff"] == 0.0 and r["opt_diff"] == 0.0 and r["step"] == 3


# ---- 2 processes ------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path, request):
    port = _free_port()
    procs = [_start(["multihost", tmp_path / f"p{pid}.json", pid, 2, port], devices=2)
             for pid in range(2)]
    try:   # the single-device reference is computed (or read) while they run
        reference = request.getfixturevalue("device_results")["lm"]["ref_losses"]
    finally:
        _wait(procs, timeout=300)
    for pid in range(2):
        r = json.loads((tmp_path / f"p{pid}.json").read_text())
        assert (r["process_index"], r["process_count"], r["device_count"]) == (pid, 2, 4)
        assert r["rows"] == [pid, 2] and r["local_batch"] == 4   # built only its half
        assert np.max(np.abs(np.subtract(r["losses"], reference))) < TOL, (r["losses"], reference)


# ---- this process ---------------------------------------------------------------

def test_mesh_parsing_and_clear_errors():
    m = MeshConfig.parse("data=2, fsdp=2,tensor=2")
    assert (m.shape, m.size, str(m)) == ((2, 2, 2), 8, "data=2,fsdp=2,tensor=2")
    assert MeshConfig.parse("tensor=4").shape == (1, 1, 4)
    for text, words in (("data=2,model=2", "'model=2'"), ("data=2,data=2", "twice"),
                        ("data=two", "not an integer"), ("data=0", "positive"), ("", "no axis")):
        with pytest.raises(ValueError, match=words):
            MeshConfig.parse(text)
    config = get_config("gpt-tiny", **TINY)
    with pytest.raises(ValueError, match=r"4 devices .* but 8 are available"):
        MeshConfig.parse("data=2,fsdp=2").validate(8)
    with pytest.raises(ValueError, match="num_heads=4 is not divisible by mesh axis tensor=8"):
        MeshConfig(tensor=8).validate(8, config)
    with pytest.raises(ValueError, match="num_kv_heads=2 is not divisible by mesh axis tensor=4"):
        MeshConfig(data=2, tensor=4).validate(8, config.replace(num_kv_heads=2))
    with pytest.raises(ValueError, match="d_model=32 is not divisible by mesh axis fsdp=64"):
        MeshConfig(fsdp=64).validate(64, config.replace(max_len=64))
    with pytest.raises(ValueError, match="batch_size=12 is not divisible by data x fsdp"):
        MeshConfig(data=8).validate(8, config, batch_size=12)
    MeshConfig(data=2, fsdp=2, tensor=2).validate(8, config, batch_size=8)


def _plain_and_boxed(config):
    ids = jnp.zeros((2, 8), jnp.int32)
    key = jax.random.PRNGKey(0)
    plain = build(config).init(key, ids)["params"]
    boxed = build(config.replace(logical_partitioning=True)).init(key, ids)["params"]
    return plain, boxed


def test_boxes_only_when_asked_and_same_values():
    config = get_config("gpt-tiny", **TINY)
    plain, boxed = _plain_and_boxed(config)
    is_box = lambda x: isinstance(x, nn.Partitioned)
    assert not any(is_box(x) for x in jax.tree.leaves(plain, is_leaf=is_box))
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(plain))
    query = boxed["decoder"]["layer_0"]["self_attention"]["query"]["kernel"]
    assert isinstance(query, nn.LogicallyPartitioned) and query.names == ("embed", "heads", "kv")
    assert boxed["embeddings"]["token"]["embedding"].names == ("vocab", "embed")
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), plain,
                                     nn.unbox(boxed)))


def test_activation_constraints_only_inside_a_mesh_and_rules():
    config = get_config("gpt-tiny", **TINY)
    model, ids = build(config), jnp.zeros((2, 8), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), ids)["params"]
    jaxpr = lambda: str(jax.make_jaxpr(lambda p: model.apply({"params": p}, ids))(params))
    assert "sharding_constraint" not in jaxpr()
    with nn.logical_axis_rules(parallel.LOGICAL_RULES):   # rules without a mesh: still none
        assert "sharding_constraint" not in jaxpr()
    with parallel.mesh_context(MeshConfig().make_mesh()):
        traced = jaxpr()
        out = model.apply({"params": params}, ids)
    assert traced.count("sharding_constraint") >= 5   # embeddings, q/k/v/out, mlp, block
    np.testing.assert_array_equal(out, model.apply({"params": params}, ids))


def test_distributed_env():
    from transformer_jax.parallel import distributed_env
    assert distributed_env({}) is None
    assert distributed_env({"JAX_NUM_PROCESSES": "1"}) is None
    env = {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1", "JAX_COORDINATOR_ADDRESS": "h:1234"}
    assert distributed_env(env) == {"coordinator_address": "h:1234", "num_processes": 2,
                                    "process_id": 1}
    with pytest.raises(ValueError, match="JAX_COORDINATOR_ADDRESS is not set"):
        distributed_env({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"})
    with pytest.raises(ValueError, match=r"JAX_PROCESS_ID=2 must lie in \[0, 2\)"):
        distributed_env({**env, "JAX_PROCESS_ID": "2"})
    with pytest.raises(ValueError, match="must be an integer"):
        distributed_env({**env, "JAX_NUM_PROCESSES": "two"})


def test_command_line_flags(tmp_path, capsys):
    from transformer_jax.run.cli import main
    from transformer_jax.run.config import RunConfig
    with pytest.raises(ValueError, match="parallel='mpi' is not valid"):
        RunConfig(parallel="mpi")
    with pytest.raises(ValueError, match="only used with --parallel shard or auto"):
        RunConfig(parallel="none", mesh="data=2")
    assert RunConfig().parallel == "auto"
    with pytest.raises(ValueError, match="'model=2' is not AXIS=SIZE"):
        RunConfig(parallel="shard", mesh="model=2")
    assert RunConfig(parallel="shard", mesh="data=2,fsdp=2,tensor=2").mesh == "data=2,fsdp=2,tensor=2"
    out = tmp_path / "run"
    code = main(["train", "--parallel", "shard", "--mesh", "data=2,fsdp=2", "--out", str(out),
                 "--no-progress"])
    assert code == 2
    assert "4 devices (2 x 2 x 1) but 1 are available" in capsys.readouterr().err
    assert not out.exists()   # refused before touching anything
