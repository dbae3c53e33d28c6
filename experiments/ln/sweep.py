"""Many training runs as one compiled program: `jax.vmap` over the train state.

Every (task, placement) of the grid is one program: the runs of its learning-rate
x schedule x seed grid differ only in arrays (parameters, Adam moments, the peak
learning rate, the warm-up length, the decay's index and the data-seed index), so
they are stacked on a leading axis and stepped together. The learning rate is set inside the step
from those per-run arrays through `optax.inject_hyperparams`, so no schedule is
baked into the compiled program. The same un-vmapped function, jitted once, runs
a single run: the equality check and the speed-up baseline. The check
(`shadow=`) steps chosen runs of a group again with the unbatched program, each
chunk from the vmapped run's own state at the chunk's start: training is chaotic,
so two free-running copies drift apart from their first 1-ulp difference, while
re-synchronised chunks compare what the two programs compute.

    train step     `transformer_jax.training.train_step` (skips non-finite updates)
    chunk          lax.scan of `eval_every` steps, then one validation pass
    program        jit(vmap(chunk)) over runs [R, ...]; data shared, indexed by seed
    devices        the run axis is split over every local device (TPU cores, GPUs):
                   runs padded to a multiple of the device count, states and
                   hyper-parameters sharded on "runs", data replicated
"""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from experiments.ln.presets import Sweep
from transformer_jax._compat import donate_argnums
from transformer_jax.models import build
from transformer_jax.training import TASKS, TrainState, decay_mask, eval_step, train_step
from transformer_jax.training.schedules import learning_rate_at


@dataclasses.dataclass(frozen=True)
class RunSpec:
    task: str
    placement: str
    peak_lr: float
    warmup: int
    seed: int
    decay: str   # the schedule after warm-up (`training.schedules.SCHEDULES`)

    @property
    def run_id(self) -> str:
        return (f"{self.task}/{self.placement}/lr{self.peak_lr:g}/wu{self.warmup}-{self.decay}"
                f"/s{self.seed}")


def group_specs(sweep: Sweep, placement: str) -> list[RunSpec]:
    return [RunSpec(sweep.task, placement, lr, wu, seed, decay) for lr in sweep.peak_lrs
            for wu, decay in sweep.arms for seed in sweep.seeds]


@functools.lru_cache(maxsize=8)   # one object per sweep: compiled programs key on it
def make_tx(sweep: Sweep) -> optax.GradientTransformation:
    """optax.adamw whose learning rate is a state entry, overwritten every step; no
    clipping. The other scalars are stored too, as per-run arrays."""
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",),
                                     hyperparam_dtype=jnp.float32)
    return adamw(learning_rate=0.0, b1=sweep.b1, b2=sweep.b2, eps=sweep.eps,
                 weight_decay=sweep.weight_decay, mask=decay_mask)


def learning_rate(step, hp: dict, sweep: Sweep):
    """The library's schedule (`training.schedules.learning_rate_at`) on traced per-run
    values: linear warm-up over hp["warmup"] updates (none when 0), then the decay
    sweep.decays[hp["decay"]] ("linear" to 0 at sweep.steps, "rsqrt", "drop" at
    sweep.drop_step, ...): every decay of the sweep is computed, the run's is picked."""
    rates = [learning_rate_at(step, hp["peak_lr"], hp["warmup"], decay, sweep.steps,
                              sweep.drop_step) for decay in sweep.decays]
    return rates[0] if len(rates) == 1 else jnp.stack(rates)[hp["decay"]]


def _step(state: TrainState, hp: dict, batch: dict, *, task: str, sweep: Sweep):
    lr = learning_rate(state.step, hp, sweep)
    opt = state.opt_state
    state = state.replace(opt_state=opt._replace(hyperparams={**opt.hyperparams,
                                                               "learning_rate": lr}))
    state, m = train_step(state, batch, task)
    return state, {"loss": m["loss"], "grad_norm": m["grad_norm"], "finite": m["finite"],
                   "lr": lr}


def _chunk(state, hp, train, valid, start, *, length: int, task: str, sweep: Sweep):
    """`length` steps from `start` on this run's data stream, then the validation metrics.
    train: {field: [seeds, steps, batch, ...]} (all runs' streams); valid: [E, batch, ...]."""
    data = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, length, 1)[hp["data"]],
                        train)
    step = functools.partial(_step, hp=hp, task=task, sweep=sweep)
    state, metrics = jax.lax.scan(lambda s, b: step(s, batch=b), state, data)
    return state, metrics, _valid_metrics(state, valid, task)


# Validation metrics recorded per task: record name -> key of the task's loss dict.
# "loss" is the one every verdict reads: for BERT the MLM loss alone (NSP is kept
# apart: summed in, its ~ln 2 would hide what MLM does), for the others the loss.
VALID_METRICS = {
    "mlm": {"loss": "mlm_loss", "accuracy": "accuracy", "nsp_loss": "nsp_loss",
            "nsp_accuracy": "nsp_accuracy"},
    "lm": {"loss": "loss", "accuracy": "accuracy"},
    "seq2seq": {"loss": "loss", "accuracy": "accuracy"},
}


def _valid_metrics(state, valid, task) -> dict:
    """{name: mean over the validation batches} of VALID_METRICS[task]."""
    names = VALID_METRICS[task]
    per_batch = jax.lax.map(
        lambda b: {k: eval_step(state, b, task)[v] for k, v in names.items()}, valid)
    return {k: jnp.mean(v) for k, v in per_batch.items()}


@functools.lru_cache(maxsize=16)
def cached_model(config):
    return build(config)


def init_params(config, task: str, key):
    """Fresh parameters, initialised eagerly (op by op) on a fixed example input:
    compiling init (its random-number generation above all) costs seconds per model,
    while eager ops are compiled once per shape and then shared by every seed, run
    and study using the same model."""
    spec = TASKS[task]
    example = spec.example_batch(config, 1, config.max_len)
    # `Task.apply` calls the method the task trains (GPT: `token_stats`).
    return spec.apply(cached_model(config).init, key, example, deterministic=True)["params"]


def init_state(config, task: str, tx, key) -> TrainState:
    """A fresh TrainState from a raw PRNGKey, split as `create_train_state` does."""
    params_key, dropout_key = jax.random.split(key)
    state = TrainState.create(apply_fn=cached_model(config).apply, params=init_params(
        config, task, params_key), tx=tx, rng=dropout_key)
    return state.replace(step=jnp.zeros((), jnp.int32))


@dataclasses.dataclass
class GroupResult:
    """Host arrays of R runs: per step [R, steps], per evaluation [R, evals]."""
    specs: list[RunSpec]
    metrics: dict[str, np.ndarray]
    val_steps: np.ndarray
    val: dict[str, np.ndarray]   # VALID_METRICS name -> [R, evals]
    compile_s: float     # wall seconds: init + lowering + XLA compilation + first validation
    run_s: float         # wall seconds of the training chunks
    cpu_s: float         # process CPU seconds of both (all threads): load-independent
                         # (scoring excluded)
    # Per-run scores of the final parameters (`score` of run_group), e.g. {"bleu": [R]}.
    final: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    score_s: float = 0.0  # wall seconds of that scoring (compilation included)
    shadows: list = dataclasses.field(default_factory=list)   # [Shadow], `shadow=` runs

    @property
    def val_loss(self) -> np.ndarray:
        return self.val["loss"]

    @property
    def wall_s(self) -> float:
        return self.compile_s + self.run_s


def _hparams(specs: list[RunSpec], sweep: Sweep) -> dict:
    seed_index = {s: i for i, s in enumerate(sweep.seeds)}
    return {"peak_lr": np.array([s.peak_lr for s in specs], np.float32),
            "warmup": np.array([s.warmup for s in specs], np.float32),
            "decay": np.array([sweep.decays.index(s.decay) for s in specs], np.int32),
            "data": np.array([seed_index[s.seed] for s in specs], np.int32)}


@dataclasses.dataclass
class Shadow:
    """Run `index` of a batched group, stepped again by the unbatched program: its
    initial validation from the shared initial state, then every chunk from the
    vmapped run's state at the chunk's start. Curves as GroupResult's, for this run."""
    index: int
    train_loss: np.ndarray   # [steps]
    val_loss: np.ndarray     # [evals], the initial one first
    compile_s: float         # wall seconds: compiling the unbatched program, first validation
    compile_cpu_s: float     # process CPU seconds of that (shared by the group's shadows)
    run_s: float             # wall seconds of this run's chunks
    cpu_s: float             # process CPU seconds of those


@jax.jit
def _index(tree, index):
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, keepdims=False), tree)


def _take(tree, index: int, device):
    """Run `index` of a stacked (possibly sharded) pytree, as arrays on `device`: one
    compiled program for every leaf (indexing leaf by leaf costs an eager op each)."""
    return jax.block_until_ready(jax.device_put(_index(tree, index), device))


class _Shadows:
    """The unbatched program following runs `indices` of a batched group chunk by chunk.
    Its time (compiling, copying states, its chunks) is kept apart from the group's;
    `wall` / `cpu`: all of it, for the group to subtract."""

    def __init__(self, config, sweep, indices, train, valid, state, hp, device):
        t0, cpu0 = time.perf_counter(), time.process_time()
        self.indices, self.device = list(indices), device
        self.train, self.valid = jax.device_put(train, device), jax.device_put(valid, device)
        chunk_fn, valid_fn = _programs(sweep, False)
        first = {j: (_take(state, j, device), _take(hp, j, device)) for j in self.indices}
        s0, h0 = first[self.indices[0]]
        self.chunk_fn = _compiled((config, sweep, None, (device,)), chunk_fn, s0, h0,
                                  self.train, self.valid, 0)
        self.val = {j: [float(valid_fn(s, self.valid)["loss"])] for j, (s, _) in first.items()}
        self.loss = {j: [] for j in self.indices}
        self.compile_s, self.compile_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
        self.run_s = dict.fromkeys(self.indices, 0.0)     # per run: its chunks alone
        self.cpu_s = dict.fromkeys(self.indices, 0.0)
        self.wall, self.cpu = 0.0, self.compile_cpu_s     # all of it after the compilation

    def _timed(self, fn, *args):
        t0, cpu0 = time.perf_counter(), time.process_time()
        out = fn(*args)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        self.wall, self.cpu = self.wall + wall, self.cpu + cpu
        return out, wall, cpu

    def starts(self, state, hp) -> dict:
        """The followed runs' states before a chunk (copies: `state` is donated to it).
        Copying is the check's cost, not a run's: it is in neither run_s nor cpu_s."""
        take = lambda: {j: (_take(state, j, self.device), _take(hp, j, self.device))
                        for j in self.indices}
        return self._timed(take)[0]

    def step(self, starts: dict, start: int) -> None:
        for j, (s, h) in starts.items():
            run = lambda: jax.device_get(self.chunk_fn(s, h, self.train, self.valid, start)[1:])
            (metrics, val), wall, cpu = self._timed(run)
            self.loss[j].append(np.asarray(metrics["loss"]))
            self.val[j].append(float(val["loss"]))
            self.run_s[j] += wall
            self.cpu_s[j] += cpu

    def results(self) -> list[Shadow]:
        return [Shadow(j, np.concatenate(self.loss[j]), np.asarray(self.val[j]), self.compile_s,
                       self.compile_cpu_s, self.run_s[j], self.cpu_s[j]) for j in self.indices]


_COMPILED: dict = {}   # (config, sweep, number of runs or None, devices) -> compiled chunk


def _compiled(key, fn, *args):
    """`fn` compiled for `args`, once per `key`, reused by later calls."""
    if key not in _COMPILED:
        _COMPILED[key] = fn.lower(*args).compile()
    return _COMPILED[key]


@functools.lru_cache(maxsize=8)
def _programs(sweep: Sweep, batched: bool):
    task = sweep.task
    chunk = functools.partial(_chunk, length=sweep.eval_every, task=task, sweep=sweep)
    valid = functools.partial(_valid_metrics, task=task)
    if batched:
        chunk = jax.vmap(chunk, in_axes=(0, 0, None, None, None))
        valid = jax.vmap(valid, in_axes=(0, None))
    # Donated: the old state's buffers hold the new one.
    return jax.jit(chunk, donate_argnums=donate_argnums(0)), jax.jit(valid)


def _spread(state, hp, train, valid, devices):
    """Runs sharded over `devices` on a 1-D mesh "runs"; data replicated on every one."""
    mesh = Mesh(np.asarray(devices), ("runs",))
    runs, whole = NamedSharding(mesh, PartitionSpec("runs")), NamedSharding(mesh, PartitionSpec())
    return (jax.device_put(state, runs), jax.device_put(hp, runs),
            jax.device_put(train, whole), jax.device_put(valid, whole))


def run_group(config, specs: list[RunSpec], sweep: Sweep, train: dict, valid: dict, *,
              batched: bool = True, progress=None, devices=None, score=None,
              shadow=()) -> GroupResult:
    """Train `specs` (one task and placement) together (batched) or as one run
    (batched=False, len(specs) == 1). `progress(i, n)` is called after each chunk.
    A batched group is spread over `devices` (default: every local device).
    `score(params)` (batched only): the runs' final parameters, stacked -> {name: [runs]}.
    `shadow` (batched only): indices of runs also stepped by the unbatched program,
    each chunk from the vmapped state (`Shadow`); their time is not the group's."""
    if not batched and len(specs) != 1:
        raise ValueError(f"batched=False runs exactly one spec, got {len(specs)}")
    if shadow and (not batched or not all(0 <= j < len(specs) for j in shadow)):
        raise ValueError(f"shadow={list(shadow)} needs batched=True and indices in "
                         f"[0, {len(specs)})")
    t0, cpu0 = time.perf_counter(), time.process_time()
    task, tx = specs[0].task, make_tx(sweep)
    devices = list(devices or jax.local_devices()) if batched else []
    runs = list(specs)
    if len(devices) > 1:   # pad with copies of the last run; their results are dropped
        runs += [specs[-1]] * (-len(specs) % len(devices))
    hp = _hparams(runs, sweep)
    # One unbatched init per distinct seed, the same for both paths; runs share them.
    inits = {seed: init_state(config, task, tx, jax.random.PRNGKey(seed))
             for seed in dict.fromkeys(s.seed for s in specs)}
    if batched:
        state = jax.tree.map(lambda *xs: jnp.stack(xs), *[inits[s.seed] for s in runs])
    else:
        state, hp = inits[specs[0].seed], jax.tree.map(lambda x: x[0], hp)
    host_data = train, valid
    if len(devices) > 1:
        state, hp, train, valid = _spread(state, hp, train, valid, devices)
    else:
        train, valid = jax.device_put(train), jax.device_put(valid)
    chunk_fn, valid_fn = _programs(sweep, batched)
    chunk_fn = _compiled((config, sweep, len(runs) if batched else None, tuple(devices)),
                         chunk_fn, state, hp, train, valid, 0)
    valid0 = jax.device_get(valid_fn(state, valid))
    compile_s = time.perf_counter() - t0
    shadows = _Shadows(config, sweep, shadow, *host_data, state, hp,
                       (devices or jax.local_devices())[0]) if shadow else None
    t0, chunks, evals = time.perf_counter(), [], [valid0]
    n = sweep.steps // sweep.eval_every
    for i in range(n):
        starts = shadows.starts(state, hp) if shadows else {}   # before `state` is donated
        state, metrics, val = chunk_fn(state, hp, train, valid, i * sweep.eval_every)
        chunks.append(jax.device_get(metrics))
        evals.append(jax.device_get(val))
        if shadows:
            shadows.step(starts, i * sweep.eval_every)
        if progress:
            progress(i + 1, n)
    run_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    if shadows:   # the shadows' time is theirs, not the group's
        run_s, cpu_s = run_s - shadows.wall, cpu_s - shadows.cpu
    t0 = time.perf_counter()
    final = {k: np.asarray(v)[:len(specs)] for k, v in score(state.params).items()} \
        if score and batched else {}
    score_s = time.perf_counter() - t0
    axis = 1 if batched else 0
    metrics = {k: np.concatenate([c[k] for c in chunks], axis) for k in chunks[0]}
    val = {k: np.stack([np.asarray(e[k]) for e in evals], -1) for k in evals[0]}
    if batched:   # drop the padding runs
        metrics = {k: v[:len(specs)] for k, v in metrics.items()}
        val = {k: v[:len(specs)] for k, v in val.items()}
    else:
        metrics = {k: v[None] for k, v in metrics.items()}
        val = {k: v[None] for k, v in val.items()}
    val_steps = np.arange(n + 1) * sweep.eval_every
    return GroupResult(specs, metrics, val_steps, val, compile_s, run_s, cpu_s, final, score_s,
                       shadows.results() if shadows else [])
