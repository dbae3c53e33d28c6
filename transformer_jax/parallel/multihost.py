"""Several processes (hosts), one program: start-up and per-process data.

A run on N processes sets, in every process,
    JAX_COORDINATOR_ADDRESS=host:port   (process 0 listens there)
    JAX_NUM_PROCESSES=N
    JAX_PROCESS_ID=i                    (0 <= i < N)
and calls `initialize_from_env()` before any other JAX call. After that
`jax.devices()` lists every process's devices, a mesh spans them all, and each
process loads only the rows of the global batch that its devices hold
(`process_batch`); `sharding.place_batch` assembles the global arrays.
"""
from __future__ import annotations

import os
from typing import Mapping

import jax
import numpy as np

from transformer_jax.parallel.sharding import batch_sharding

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} must be an integer") from None


def distributed_env(environ: Mapping[str, str] | None = None) -> dict | None:
    """The `jax.distributed.initialize` arguments the environment describes, or None
    when it describes a single process (JAX_NUM_PROCESSES unset or 1)."""
    environ = os.environ if environ is None else environ
    if ENV_NUM_PROCESSES not in environ:
        return None
    num = _env_int(environ, ENV_NUM_PROCESSES)
    if num < 1:
        raise ValueError(f"{ENV_NUM_PROCESSES}={num} must be at least 1")
    if num == 1:
        return None
    missing = [n for n in (ENV_COORDINATOR, ENV_PROCESS_ID) if not environ.get(n)]
    if missing:
        raise ValueError(f"{ENV_NUM_PROCESSES}={num} describes a multi-process run, but "
                         f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set")
    pid = _env_int(environ, ENV_PROCESS_ID)
    if not 0 <= pid < num:
        raise ValueError(f"{ENV_PROCESS_ID}={pid} must lie in [0, {num}) for {ENV_NUM_PROCESSES}={num}")
    address = environ[ENV_COORDINATOR]
    if ":" not in address:
        raise ValueError(f"{ENV_COORDINATOR}={address!r} must be host:port")
    return {"coordinator_address": address, "num_processes": num, "process_id": pid}


def enable_cpu_collectives() -> None:
    """Cross-process collectives on the CPU backend go through Gloo (the default in
    recent JAX; older versions had none). Must run before the backend starts."""
    name = "jax_cpu_collectives_implementation"
    try:
        current = getattr(jax.config, name)
    except AttributeError:   # a JAX without the option: nothing to choose
        return
    if current in (None, "", "none"):
        jax.config.update(name, "gloo")


def initialize_from_env(environ: Mapping[str, str] | None = None, *,
                        timeout_s: int = 300) -> bool:
    """`jax.distributed.initialize` when the environment describes several processes;
    returns whether it did. Call before anything else touches JAX devices."""
    spec = distributed_env(environ)
    if spec is None:
        return False
    enable_cpu_collectives()
    jax.distributed.initialize(**spec, initialization_timeout=timeout_s)
    return True


def process_rows(mesh: jax.sharding.Mesh, global_batch_size: int) -> tuple[int, int]:
    """(process_index, process_count) in the sense of `ExampleDataset.batch`: this
    process's devices hold global rows [i * B / n, (i + 1) * B / n) of `[B, ...]`.
    ValueError if the mesh gives a process rows that are not such a contiguous slice."""
    sharding = batch_sharding(mesh)
    rows = set()
    for index in sharding.addressable_devices_indices_map((global_batch_size,)).values():
        rows.update(range(*index[0].indices(global_batch_size)))
    count = global_batch_size // max(len(rows), 1)
    start = min(rows)
    if len(rows) * count != global_batch_size or start % len(rows) or \
            rows != set(range(start, start + len(rows))) or count != jax.process_count():
        raise ValueError(f"the mesh {dict(mesh.shape)} gives process {jax.process_index()} of "
                         f"{jax.process_count()} the batch rows {sorted(rows)} of "
                         f"{global_batch_size}, not its own contiguous slice; choose data x fsdp "
                         "as a multiple of the process count so the batch axes span processes")
    return start // len(rows), count


def process_batch(dataset, step: int, global_batch_size: int, mesh: jax.sharding.Mesh,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """This process's rows `[B / process_count, ...]` of the global batch `step` (an
    `ExampleDataset`): only those examples are built."""
    index, count = process_rows(mesh, global_batch_size)
    return dataset.batch(step, global_batch_size, seed, process_index=index, process_count=count)
