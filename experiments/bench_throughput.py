"""Training-step throughput of the library's real train step, against a matmul
ceiling measured in the same process.

    python -m experiments.bench_throughput --preset gpt2-small --batch 4 --seq 256          # CPU
    python -m experiments.bench_throughput --preset gpt2-small --batch 12 --seq 1024 \\
        --dtype bfloat16 --attention cudnn --compare attention=xla                          # GPU

Prints step time (median of --steps after compilation), tokens/s, model TFLOP/s,
the fraction of a square matmul's FLOP/s measured here (fp32 on CPU, the compute
dtype elsewhere), compile time and peak memory. `--compare field=value` adds a
variant row measured in the same run, so every ratio is taken side by side.

FLOPs per token follow nanoGPT: 6 N + 12 L d T with N excluding position
embeddings (Kaplan et al. 2020, arXiv 2001.08361). For BERT the MLM head runs only
at the predicted positions, so its FLOPs are counted only there.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from transformer_jax.models import get_config
from transformer_jax.training import (count_params, create_train_state, get_task, make_optimizer,
                                      make_train_step, measure_matmul_peak, task_for_config)


def random_batch(task: str, config, batch: int, seq: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config.vocab_size, size=(batch, seq + 1), dtype=np.int32)
    if task == "lm":
        return {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
                "loss_mask": np.ones((batch, seq), np.float32)}
    preds = max(1, round(0.15 * seq))  # Devlin et al.: 15% of tokens predicted
    positions = np.sort(rng.permuted(np.tile(np.arange(1, seq), (batch, 1)), axis=1)[:, :preds], 1)
    return {"input_ids": ids[:, :-1], "token_type_ids": (np.arange(seq) >= seq // 2)[None].repeat(batch, 0).astype(np.int32),
            "attention_mask": np.ones((batch, seq), bool), "mlm_positions": positions.astype(np.int32),
            "mlm_ids": ids[:, :preds], "mlm_weights": np.ones((batch, preds), np.float32),
            "nsp_labels": rng.integers(0, 2, size=(batch,), dtype=np.int32)}


def flops_per_token(config, params, task: str, batch: dict, seq: int) -> float:
    n = count_params(params, exclude_position=True)
    attention = 12 * config.num_layers * config.d_model * seq
    if task != "mlm":
        return 6 * n + attention
    # The tied output projection (V x d) and the head transform (d x d) act only at
    # the P predicted positions of L, not at every token.
    head = config.vocab_size * config.d_model + config.d_model ** 2
    frac = batch["mlm_positions"].shape[1] / seq
    return 6 * (n - head) + 6 * head * frac + attention


def measure(config, task: str, batch_size: int, seq: int, steps: int) -> dict:
    tx = make_optimizer(1e-4)
    state = create_train_state(config, tx, jax.random.PRNGKey(0), task=task)
    batch = jax.device_put(random_batch(task, config, batch_size, seq))
    step = make_train_step(get_task(task))
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
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
            "compile_s": compile_s, "peak_mem_gb": _peak_memory(compiled),
            "loss": float(metrics["loss"])}


def _peak_memory(compiled) -> float:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 1e9
    analysis = compiled.memory_analysis()  # CPU: the compiled program's own buffers
    total = sum(getattr(analysis, f, 0) or 0 for f in
                ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes"))
    return total / 1e9


def _parse_compare(items: list[str]) -> list[dict]:
    variants = []
    for item in items:
        fields = {}
        for kv in item.split(","):
            key, sep, value = kv.partition("=")
            if not sep:
                raise SystemExit(f"--compare {item!r}: expected field=value[,field=value]")
            fields[key] = int(value) if value.isdigit() else value
        variants.append(fields)
    return variants


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt2-small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", default=None, help="compute dtype (default: float32 on CPU, bfloat16 elsewhere)")
    p.add_argument("--attention", default="xla")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--matmul-size", type=int, default=None)
    p.add_argument("--compare", action="append", default=[], help="variant, e.g. attention=xla")
    args = p.parse_args(argv)
    cpu = jax.default_backend() == "cpu"
    dtype = args.dtype or ("float32" if cpu else "bfloat16")
    base = get_config(args.preset, dtype=dtype, attention={"kind": args.attention},
                      dropout=0.0, attention_dropout=0.0)
    task = task_for_config(base)
    ceiling = measure_matmul_peak(dtype, args.matmul_size or (2048 if cpu else 8192)) / 1e12
    print(f"device {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
          f"{dtype} matmul ceiling {ceiling:.2f} TFLOP/s")
    print(f"{'variant':32} {'step ms':>9} {'tok/s':>10} {'TFLOP/s':>8} {'of ceiling':>10} "
          f"{'compile s':>9} {'mem GB':>7} {'loss':>7}")
    rows = [("baseline", base)] + [(",".join(f"{k}={v}" for k, v in v.items()), base.replace(
        **{k: ({"kind": val} if k == "attention" else val) for k, val in v.items()}))
        for v in _parse_compare(args.compare)]
    results = []
    for name, config in rows:
        r = measure(config, task, args.batch, args.seq, args.steps)
        # Re-measure the ceiling beside every row and keep the best: on a shared
        # machine a single early measurement can land in a busy moment.
        ceiling = max(ceiling, measure_matmul_peak(dtype, args.matmul_size or (2048 if cpu else 8192)) / 1e12)
        results.append(r)
        print(f"{name:32} {r['step_ms']:9.1f} {r['tokens_per_s']:10.0f} {r['model_tflops']:8.3f} "
              f"{r['model_tflops'] / ceiling:10.1%} {r['compile_s']:9.1f} {r['peak_mem_gb']:7.2f} "
              f"{r['loss']:7.3f}")
    print(f"best {dtype} matmul ceiling seen: {ceiling:.3f} TFLOP/s")
    if len(results) > 1:
        for (name, _), r in zip(rows[1:], results[1:]):
            print(f"{name}: {results[0]['step_ms'] / r['step_ms']:.2f}x baseline speed")


if __name__ == "__main__":
    main()
