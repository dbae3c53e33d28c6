"""Training-step throughput of the library's real train step, against a matmul
ceiling measured in the same process.

    python -m experiments.bench_throughput --preset gpt2-small --batch 4 --seq 256          # CPU
    python -m experiments.bench_throughput --preset gpt2-small --batch 12 --seq 1024 \\
        --set vocab_pad_multiple=128 --compare attention=xla --compare plain              # GPU

Prints step time (median of --steps after compilation), tokens/s, model TFLOP/s,
the fraction of a square matmul's FLOP/s measured here (fp32 on CPU, the compute
dtype elsewhere), compile time, the compiled step's memory and the loss after the
timed steps (every row starts from the same seed and batch, so losses compare).
`--set field=value` changes the baseline; `--compare field=value` (any config
field, plus `attention=KIND`, `donate=false` and XLA compiler options such as
`xla_gpu_enable_triton_gemm=false`, applied to that row's compilation only) or
`--compare plain` (every switch off) adds a variant row measured in the same
run, so every ratio is taken side by side. `--profile [DIR]` traces five
baseline steps and prints the device time per step by phase (forward, backward,
update) and by module (`experiments/trace_summary.py`). `--cost-only` compiles
the rows without running them and prints XLA's FLOPs and bytes accessed, a
proxy for memory traffic that needs no accelerator.

FLOPs per token follow nanoGPT: 6 N + 12 L d T with N excluding position
embeddings (Kaplan et al. 2020, arXiv 2001.08361). For BERT the MLM head runs only
at the predicted positions, so its FLOPs are counted only there.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from experiments import trace_summary
from transformer_jax.attention import registry
from transformer_jax.models import PRESETS, build, get_config
from transformer_jax.run.files import check_output_dir
from transformer_jax.stacks import stack_layers
from transformer_jax.training import (count_params, create_train_state, get_task, init_params,
                                      make_optimizer, make_train_step, measure_matmul_peak,
                                      model_flops_per_token, task_for_config)
from transformer_jax.training.metrics import program_bytes
from transformer_jax.training.tasks import TASKS
from transformer_jax.training.step import apply_grads, compute_grads, compute_loss


# Upper bound (exclusive) of each integer batch field, from (model config, seq).
_TOKEN_FIELDS = ("input_ids", "targets", "mlm_ids", "src_ids", "tgt_in", "tgt_out")
INT_FIELD_LIMITS = {
    **{name: lambda config, seq: config.vocab_size for name in _TOKEN_FIELDS},
    "token_type_ids": lambda config, seq: config.type_vocab_size,
    "mlm_positions": lambda config, seq: seq,
    "nsp_labels": lambda config, seq: 2,
}


def _random_ints(name: str, shape: tuple, config, seq: int, rng) -> np.ndarray:
    """Random int32 values of batch field `name` in its range; MLM positions are
    distinct and sorted within a row, as the data pipeline's are."""
    if name not in INT_FIELD_LIMITS:
        raise ValueError(f"integer batch field {name!r} has no range in INT_FIELD_LIMITS; "
                         f"known fields: {sorted(INT_FIELD_LIMITS)}")
    high = INT_FIELD_LIMITS[name](config, seq)
    if name == "mlm_positions":
        rows = rng.permuted(np.tile(np.arange(high, dtype=np.int32), (shape[0], 1)), axis=1)
        return np.sort(rows[:, :shape[1]], axis=1)
    return rng.integers(0, high, size=shape, dtype=np.int32)


def random_batch(task: str, config, batch: int, seq: int, seed: int = 0) -> dict:
    """A batch of `task` with the fields, shapes and dtypes of its `example_batch`:
    integer fields random in range (`INT_FIELD_LIMITS`), masks and weights as
    `example_batch` gives them (every position real)."""
    spec = get_task(task)
    if spec.with_labels is not None:   # a head over a label set: not a pre-training step
        raise ValueError(f"task={task!r}: the benchmark times pre-training tasks "
                         f"({', '.join(n for n, t in TASKS.items() if t.with_labels is None)})")
    rng = np.random.default_rng(seed)
    template = spec.example_batch(config, batch, seq)
    return {name: (_random_ints(name, np.shape(value), config, seq, rng)
                   if np.issubdtype(np.asarray(value).dtype, np.integer) else value)
            for name, value in template.items()}


def flops_per_token(config, params, task: str, batch: dict, seq: int) -> float:
    n = count_params(params, exclude_position=True)
    flops = model_flops_per_token(config, seq, num_params=n)
    if task != "mlm":
        return flops
    # The tied output projection (V x d) and the head transform (d x d) act only at
    # the P predicted positions of L, not at every token.
    head = config.vocab_size * config.d_model + config.d_model ** 2
    frac = batch["mlm_positions"].shape[1] / seq
    return flops - 6 * head * (1 - frac)


def _layout_only(config):
    """The config with every field that leaves the plain parameter tree unchanged reset."""
    fields = dict(vocab_pad_multiple=1, scan_layers=False, fused_qkv=True, remat="none",
                  attention={"kind": "xla"}, dtype="float32")
    if hasattr(config, "loss_chunk"):
        fields["loss_chunk"] = 0
    return config.replace(**fields)


@functools.lru_cache(maxsize=4)
def _plain_params(config, task: str):
    # Drawn once per run (initialising GPT-2 takes seconds), converted per row.
    return init_params(config, jax.random.PRNGKey(0), task=task)[0]


def same_start(config, task: str):
    """Parameters for `config` drawn in the plain layout (unpadded vocabulary, unrolled
    layers) and converted, so that every row of a run starts from the same weights
    and their losses after the timed steps compare the arithmetic, not the init."""
    params = jax.tree.map(jnp.copy, _plain_params(_layout_only(config), task))  # steps donate
    flat = traverse_util.flatten_dict(params)
    for path, table in flat.items():
        extra = config.padded_vocab_size - table.shape[0]
        if path[-3:] == ("embeddings", "token", "embedding") and extra:
            rows = config.init_std * jax.random.normal(jax.random.PRNGKey(1), (extra, table.shape[1]))
            flat[path] = jnp.concatenate([table, rows.astype(table.dtype)])
    params = traverse_util.unflatten_dict(flat)
    return stack_layers(params, config.num_layers) if config.scan_layers else params


def _compile(task: str, state, batch, donate: bool, options):
    """The library's train step compiled for (state, batch), with `options` (XLA
    compiler options) for this compilation only."""
    step = make_train_step(get_task(task), donate=donate)
    return step.lower(state, batch).compile(compiler_options=options or None)


def prepare(config, task: str, batch_size: int, seq: int, donate: bool = True, options=None):
    """(compiled train step, its state, batch, compile seconds) from the same start."""
    tx = make_optimizer(1e-4)
    state = create_train_state(config, tx, jax.random.PRNGKey(0), task=task,
                               params=same_start(config, task))
    batch = jax.device_put(random_batch(task, config, batch_size, seq))
    t0 = time.perf_counter()
    compiled = _compile(task, state, batch, donate, options)
    return compiled, state, batch, time.perf_counter() - t0


def measure(config, task: str, batch_size: int, seq: int, steps: int, donate: bool = True,
            keep: bool = False, options=None) -> dict:
    """Timings of the train step; `keep` adds "run": (compiled step, last state, batch)
    for a profile that should not compile the step again."""
    compiled, state, batch, compile_s = prepare(config, task, batch_size, seq, donate, options)
    fpt = flops_per_token(config, state.params, task, batch, seq)
    for _ in range(3):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics["loss"])
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t)
    dt = statistics.median(times)
    tokens = batch_size * seq
    return {"step_ms": dt * 1e3, "tokens_per_s": tokens / dt, "model_tflops": fpt * tokens / dt / 1e12,
            "compile_s": compile_s, "program_gb": (program_bytes(compiled) or float("nan")) / 1e9,
            "loss": float(metrics["loss"]), "steps": int(state.step),
            **({"run": (compiled, state, batch)} if keep else {})}


def cost(config, task: str, batch_size: int, seq: int, donate: bool = True, options=None) -> dict:
    """XLA's cost analysis of the compiled train step, without running it (abstract
    state): FLOPs and bytes accessed as this backend's compiler counts them."""
    tx = make_optimizer(1e-4)
    state = jax.eval_shape(lambda: create_train_state(config, tx, jax.random.PRNGKey(0), task=task))
    compiled = _compile(task, state, random_batch(task, config, batch_size, seq), donate, options)
    analysis = compiled.cost_analysis()
    analysis = (analysis[0] if isinstance(analysis, (list, tuple)) else analysis) or {}
    return {"tflop": analysis.get("flops", float("nan")) / 1e12,
            "gb_accessed": analysis.get("bytes accessed", float("nan")) / 1e9,
            "program_gb": (program_bytes(compiled) or float("nan")) / 1e9}


def _median_ms(compiled, args, steps: int, donated: bool = False) -> float:
    """Median wall ms of `compiled(*args)`; a donated first argument is threaded through."""
    out = compiled(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(steps):
        if donated:
            args = (out[0], *args[1:])
        t0 = time.perf_counter()
        out = compiled(*args)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def breakdown(config, task: str, batch_size: int, seq: int, steps: int, options=None) -> dict:
    """Median ms of the step's parts, each jitted alone: the loss (forward), the loss
    and gradients (forward + backward), the update as the train step does it
    (`apply_grads`: clipping, AdamW, the skip-if-non-finite select and the norm
    metrics) and a bare optax AdamW update, on gradient-shaped random arrays."""
    params = same_start(config, task)
    model = build(config)
    batch = jax.device_put(random_batch(task, config, batch_size, seq))
    t = get_task(task)
    rng = jax.random.PRNGKey(0)
    out = {}
    for name, fn in {"forward": lambda p, b: compute_loss(model.apply, p, b, rng, t)["loss"],
                     "forward+backward": lambda p, b: compute_grads(model.apply, p, b, rng, t)[2]
                     }.items():
        out[name] = _median_ms(jax.jit(fn).lower(params, batch).compile(options), (params, batch), steps)
    tx = make_optimizer(1e-4)
    grads = jax.tree.map(lambda x: 1e-3 * jax.random.normal(rng, x.shape, x.dtype), params)
    state = create_train_state(config, tx, rng, task=task, params=jax.tree.map(jnp.copy, params))
    update = jax.jit(lambda s, g: apply_grads(s, g), donate_argnums=(0,))
    out["update (apply_grads)"] = _median_ms(update.lower(state, grads).compile(options),
                                             (state, grads), steps, donated=True)
    adamw = optax.adamw(1e-4)

    def bare(pair, g):
        p, opt = pair
        updates, opt = adamw.update(g, opt, p)
        return (optax.apply_updates(p, updates), opt), None
    pair = (jax.tree.map(jnp.copy, params), adamw.init(params))
    bare_fn = jax.jit(bare, donate_argnums=(0,))
    out["bare optax.adamw"] = _median_ms(bare_fn.lower(pair, grads).compile(options), (pair, grads),
                                         steps, donated=True)
    return out


# Every speed switch off: XLA attention, separate Q/K/V matmuls, whole logits,
# unpadded vocabulary, unrolled layers, no buffer donation (`--compare plain`).
PLAIN = {"attention": "xla", "fused_qkv": False, "loss_chunk": 0, "vocab_pad_multiple": 1,
         "scan_layers": False, "remat": "none", "donate": False}


def _value(text: str):
    """A flag's value as the config field wants it: true/false, none, an int
    (-3, 128), a float (0.02, 1e-6), else the text (a name such as "xla")."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _parse_fields(item: str) -> dict:
    if item == "plain":
        return dict(PLAIN)
    fields = {}
    for kv in item.split(","):
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise ValueError("expected field=value[,field=value] or 'plain'")
        fields[key] = _value(value)
    return fields


def _check_names(config, fields: dict) -> None:
    """ValueError naming a field that is not the config's, before `config.replace`
    fails on it with a TypeError (`_apply` has taken donate and xla_* out)."""
    known = sorted(f.name for f in dataclasses.fields(config))
    unknown = [k for k in fields if k not in known]
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not a field of {type(config).__name__}; valid: "
                         f"{', '.join(known)}, donate, or an xla_* compiler option")


def _apply(config, fields: dict):
    """(config with `fields` set, donate flag, XLA compiler options): "attention" names
    the kernel kind; fields named xla_* are compiler options for that row's
    compilation (e.g. xla_gpu_enable_triton_gemm=false), measured in the same process."""
    fields = dict(fields)
    donate = fields.pop("donate", True)
    options = {k: fields.pop(k) for k in list(fields) if k.startswith("xla_")}
    if "attention" in fields:
        fields["attention"] = {"kind": fields["attention"]}
    if "loss_chunk" in fields and not hasattr(config, "loss_chunk"):
        fields.pop("loss_chunk")   # only GPT computes its loss in chunks
    _check_names(config, fields)
    return config.replace(**fields), donate, options


def rows_of(base, base_fields: dict, args) -> list[tuple]:
    """[(name, config, donate, compiler options)]: the baseline, then one row per --compare."""
    rows = [("baseline" + (f" ({','.join(args.set)})" if args.set else ""), *_apply(base, base_fields))]
    for item in args.compare:
        rows.append((item, *_apply(base, {**base_fields, **_parse_fields(item)})))
    return rows


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt2-small", choices=PRESETS, metavar="PRESET",
                   help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence (<= max_len)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: float32 on CPU, bfloat16 elsewhere)")
    p.add_argument("--attention", default="auto",
                   help="the baseline's attention.kind (registry names, e.g. xla, cudnn, chunked)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per row")
    p.add_argument("--matmul-size", type=int, default=None,
                   help="side of the square matmul timed as the FLOP/s ceiling "
                        "(default 2048 on CPU, 8192 elsewhere)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the baseline's forward and forward+backward alone")
    p.add_argument("--profile", nargs="?", const="runs/profile", default=None, metavar="DIR",
                   help="also trace 5 baseline steps into DIR and print device time by phase and module")
    p.add_argument("--cost-only", action="store_true",
                   help="compile each row without running it and print XLA's FLOPs and bytes "
                        "accessed (e.g. the GPU shapes with --dtype bfloat16 on a CPU)")
    p.add_argument("--set", action="append", default=[], help="baseline fields, e.g. vocab_pad_multiple=128")
    p.add_argument("--compare", action="append", default=[],
                   help="a variant row: field=value[,field=value] (attention=xla, donate=false, ...) or 'plain'")
    return p


def _rows(args, dtype: str) -> list[tuple]:
    """The rows (`rows_of`) of the preset with `--set` applied as the baseline."""
    preset = get_config(args.preset, dtype=dtype, attention={"kind": args.attention},
                        dropout=0.0, attention_dropout=0.0)
    base_fields = {}
    for item in args.set:
        base_fields.update(_parse_fields(item))
    return rows_of(preset, base_fields, args)


def _checked_rows(parser, args, dtype: str) -> list[tuple]:
    """`_rows`, each flag checked before anything is compiled or measured: a bad one
    is a usage error naming the flag and its value (one line, exit status 2)."""
    for flag, value in (("--batch", args.batch), ("--seq", args.seq), ("--steps", args.steps),
                        ("--matmul-size", args.matmul_size)):
        if value is not None and value < 1:
            parser.error(f"{flag} {value}: must be a positive integer")
    try:
        get_config(args.preset, attention={"kind": args.attention})
    except ValueError as e:
        parser.error(f"--attention {args.attention!r}: {e}")
    # Each --set and --compare alone, so that the error names the one at fault.
    for flag, item, given in ([("--set", i, dict(vars(args), set=[i], compare=[])) for i in args.set]
                              + [("--compare", i, dict(vars(args), compare=[i]))
                                 for i in args.compare]):
        try:
            _rows(argparse.Namespace(**given), dtype)
        except (TypeError, ValueError) as e:
            parser.error(f"{flag} {item!r}: {e}")
    rows = _rows(args, dtype)
    for name, config, *_ in rows:
        reason = (registry.cudnn_unavailable_reason(config.compute_dtype)
                  if config.attention.kind == "cudnn" else None)
        if reason:   # found while compiling otherwise, as a "failed" row
            parser.error(f"row {name!r}: attention.kind='cudnn' cannot run here: {reason}")
        if args.seq > config.max_len:
            parser.error(f"--seq {args.seq}: row {name!r} has max_len={config.max_len} positions; "
                         f"give --seq <= {config.max_len} (or --set max_len=N)")
    return rows


def _print_costs(args, rows, task: str, dtype: str) -> None:
    print(f"{args.preset} batch {args.batch}x{args.seq}, {dtype}, compiled for {jax.default_backend()}")
    print("| variant | TFLOP/step | GB accessed | program GB |\n|---|---|---|---|")
    for name, config, donate, options in rows:
        c = cost(config, task, args.batch, args.seq, donate, options)
        print(f"| {name} | {c['tflop']:.2f} | {c['gb_accessed']:.1f} | {c['program_gb']:.2f} |",
              flush=True)


def _measure_rows(args, rows, task: str, ceiling_of) -> tuple[list, float]:
    """(one `measure` result per row, None where it failed; the best matmul ceiling
    seen). `ceiling_of()` measures the ceiling in TFLOP/s."""
    ceiling = ceiling_of()
    results = []
    for name, config, donate, options in rows:
        try:
            r = measure(config, task, args.batch, args.seq, args.steps, donate,
                        keep=bool(args.profile) and not results, options=options)
        except Exception as e:  # one failing variant must not lose the others' numbers
            print(f"{name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            results.append(None)
            continue
        # Re-measure the ceiling beside every row and keep the best: on a shared
        # machine a single early measurement can land in a busy moment.
        ceiling = max(ceiling, ceiling_of())
        results.append(r)
        print(f"  {name}: {r['step_ms']:.2f} ms, {r['tokens_per_s']:,.0f} tok/s, "
              f"{r['model_tflops'] / ceiling:.1%} of {ceiling:.1f} TFLOP/s, compile {r['compile_s']:.1f} s, "
              f"{r['program_gb']:.2f} GB, loss {r['loss']:.5f}", flush=True)
    return results, ceiling


def _print_breakdown(args, base, task: str, options, step_ms: float) -> None:
    parts = breakdown(base, task, args.batch, args.seq, args.steps, options)
    print("baseline breakdown: " + ", ".join(f"{k} {v:.2f} ms" for k, v in parts.items())
          + f", full step {step_ms:.2f} ms", flush=True)


def _print_profile(result: dict, directory: str, donated: bool) -> None:
    compiled, state, batch = result.pop("run")
    try:
        print("baseline profile (5 steps, jax.profiler):\n"
              + trace_summary.profile(compiled, (state, batch), 5, directory,
                                      donated=donated, step_ms=result["step_ms"]),
              flush=True)
    except Exception as e:  # a profiler problem must not lose the table below
        print(f"profile: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)


def _print_table(rows, results, ceiling: float) -> None:
    base = results[0]
    print(f"| variant | step ms | tokens/s | model TFLOP/s | of ceiling | vs baseline | compile s "
          f"| program GB | loss after {base['steps'] if base else '?'} steps |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (name, *_), r in zip(rows, results):
        if r is None:
            print(f"| {name} | failed | | | | | | | |")
            continue
        speed = f"{base['step_ms'] / r['step_ms']:.2f}x" if base else ""
        print(f"| {name} | {r['step_ms']:.2f} | {r['tokens_per_s']:,.0f} | {r['model_tflops']:.3g} "
              f"| {r['model_tflops'] / ceiling:.1%} | {speed} | {r['compile_s']:.1f} "
              f"| {r['program_gb']:.2f} | {r['loss']:.5f} |")


def main(argv=None) -> int:
    """The benchmark; returns the exit status: 1 if a row failed (its error is printed
    and the other rows' numbers are kept), else 0."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.profile:   # checked before minutes of measuring, not after
        check_output_dir(args.profile, "--profile", parser)
    cpu = jax.default_backend() == "cpu"
    dtype = args.dtype or ("float32" if cpu else "bfloat16")
    rows = _checked_rows(parser, args, dtype)
    _, base, base_donate, base_options = rows[0]
    task = task_for_config(base)
    if args.cost_only:
        _print_costs(args, rows, task, dtype)
        return 0
    size = args.matmul_size or (2048 if cpu else 8192)
    repeats = 5 if cpu else 20
    print(f"device {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"flax {flax.__version__}; {args.preset} batch {args.batch}x{args.seq}, {dtype}", flush=True)
    results, ceiling = _measure_rows(
        args, rows, task, lambda: measure_matmul_peak(dtype, size, repeats) / 1e12)
    if args.breakdown and results[0]:
        _print_breakdown(args, base, task, base_options, results[0]["step_ms"])
    if args.profile and results[0]:
        _print_profile(results[0], args.profile, base_donate)
    print(f"\n{dtype} {size}^3 matmul ceiling (best seen in this process): {ceiling:.2f} TFLOP/s")
    _print_table(rows, results, ceiling)
    failed = [name for (name, *_), r in zip(rows, results) if r is None]
    if failed:
        print(f"bench_throughput: {len(failed)} row(s) failed: {', '.join(failed)} (errors above)",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
