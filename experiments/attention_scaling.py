"""Time and peak memory of every attention variant against sequence length.

    python -m experiments.attention_scaling [--max-len 16384] [--out DIR]   # DIR: runs/attention_scaling
    python -m experiments.attention_scaling --tpu [--out DIR]   # splash vs XLA, 1K-32K

Forward + backward (gradients w.r.t. q, k, v) of one attention call, batch 1,
8 heads, head_dim 64, bidirectional and causal (`--modes`; causal for every kind
whose registry entry accepts `causal=True`, so not Linformer): float32 on CPU;
bfloat16 plus the cuDNN flash kernel on GPU. Each kernel is called through the
registry exactly as `MultiHeadAttention` calls it.

Peak memory is the compiled executable's own account
(`jax.jit(f).lower(...).compile().memory_analysis()`: temporaries + arguments +
outputs - aliased), so it is exact for the program and needs no allocation;
full attention is skipped at lengths where that peak exceeds the memory
available. Ratios compare with full (`xla`) attention at the same length in the
same run. Writes `results.csv`, `scaling.png` and `table.md` to --out.

`--tpu` measures the Pallas splash kernel against `xla`, and `splash_local`
against `local`, at 1K-32K in bfloat16 on a TPU (docs/attention.md). Off a TPU
splash runs in Pallas interpret mode, so there the mode is a functional check only.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.attention import registry
from transformer_jax.attention.config import AttentionConfig
from transformer_jax.attention.variants.performer import orthogonal_random_features
from transformer_jax.run.files import check_output_dir
from transformer_jax.training.metrics import program_bytes

HEADS, HEAD_DIM = 8, 64
KINDS = ("xla", "chunked", "local", "longformer", "bigbird", "linformer", "linear", "performer")
# --tpu: the Pallas splash kernel against full XLA attention, and its sliding-window
# mask against the `local` kernel (on a CPU splash runs in Pallas interpret mode).
TPU_KINDS = ("xla", "splash", "local", "splash_local")
EXTRA_KINDS = ("cudnn", "splash", "splash_local")  # rows after KINDS in the table and plot
LINEAR_KINDS = ("local", "longformer", "bigbird", "linformer", "linear", "performer")
# Tay et al. 2020, Long Range Arena (arXiv 2011.04006), Table 2: speed-up over the
# vanilla Transformer at 4K tokens on TPU v3 (BigBird "1.1x"; Longformer and chunked
# are not in the table).
LRA_SPEEDUP_4K = {"linformer": 5.5, "performer": 5.7, "linear": 5.6, "local": 5.3, "bigbird": 1.1}
TARGET_N, TARGET_SPEEDUP, TARGET_MEMORY, TARGET_SLOPE = 8192, 4.0, 1 / 8, 1.25


def bench_config(max_len: int) -> AttentionConfig:
    """The defaults of AttentionConfig (BigBird-ITC: block 64, 3+2+3 blocks; window 128;
    k = 64; 256 features); Linformer is built for the longest length measured."""
    return AttentionConfig(linformer_max_len=max_len, query_chunk=256, key_chunk=256)


def kernel_extra(kind: str, config: AttentionConfig, dtype):
    """What `make_extra` would give the kernel: Linformer's E, F or Performer's W."""
    rng = np.random.default_rng(0)
    if kind == "linformer":
        shape = (config.linformer_k, config.linformer_max_len)
        std = 1.0 / math.sqrt(config.linformer_max_len)
        return {name: jnp.asarray(std * rng.standard_normal(shape), dtype)
                for name in ("linformer_e", "linformer_f")}
    if kind == "performer":
        return {"performer_projection": jnp.asarray(
            orthogonal_random_features(config.num_features, HEAD_DIM, 0))}
    return {}


MODES = ("bidirectional", "causal")


def supports(kind: str, config: AttentionConfig, causal: bool) -> bool:
    """Whether the registry accepts `kind` with this causality (its own validator)."""
    try:
        registry.validate(config.replace(kind=kind), causal=causal, position="learned",
                          attention_dropout=0.0)
    except ValueError:
        return False
    return True


def loss_and_grads(kind: str, config: AttentionConfig, causal: bool = False):
    fn = registry.get(kind).fn

    def loss(q, k, v, extra, ct):
        out = fn(q, k, v, mask=None, bias=None, causal=causal, config=config, extra=extra,
                 dropout_rate=0.0, dropout_rng=None, deterministic=True)
        return jnp.sum(out.astype(jnp.float32) * ct)

    return jax.value_and_grad(loss, argnums=(0, 1, 2))


def available_bytes() -> int:
    if jax.default_backend() != "cpu":
        stats = jax.devices()[0].memory_stats() or {}
        return int(stats.get("bytes_limit", 16 << 30))
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def prepare(kind: str, n: int, config: AttentionConfig, dtype, inputs, causal=False) -> dict:
    """Compiles forward+backward of `kind` at length n; reads its peak memory."""
    q, k, v, ct = inputs
    args = (q, k, v, kernel_extra(kind, config, dtype), ct)
    compiled = jax.jit(loss_and_grads(kind, config, causal)).lower(*args).compile()
    peak = program_bytes(compiled)
    row = dict(kind=kind, n=n, causal=causal, dtype=jnp.dtype(dtype).name,
               device=jax.devices()[0].device_kind, peak_mb=peak / 2**20, time_s=float("nan"),
               status="ok")
    if peak > 0.7 * available_bytes():
        row["status"] = f"skipped: needs {peak / 2**30:.1f} GiB"
    return dict(row=row, run=lambda: jax.block_until_ready(compiled(*args)))


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure_rounds(cases: list[dict], rounds: int, slow_s: float = 20.0) -> None:
    """Best wall time of each case over `rounds` passes (after one warm-up call), so
    that a burst of load from other processes inflates one pass, not the minimum.
    Within a pass one variant runs at every length back to back, so its slope is
    measured under one load. Cases slower than slow_s are timed once."""
    order = sorted(cases, key=lambda c: (c["row"]["causal"], KINDS.index(c["row"]["kind"])
                                         if c["row"]["kind"] in KINDS else len(KINDS), c["row"]["n"]))
    for r in range(rounds):
        for case in order:
            row = case["row"]
            if row["status"] != "ok" or (r > 0 and row["time_s"] > slow_s):
                continue
            t = timed(case["run"])
            if r == 0 and t < slow_s:
                t = timed(case["run"])  # the first call paid one-off costs
            row["time_s"] = t if math.isnan(row["time_s"]) else min(row["time_s"], t)
            print(f"round {r}: {_label(row):>19} n={row['n']:>6} {t * 1e3:10.1f} ms "
                  f"{row['peak_mb']:10.1f} MB", flush=True)


def add_ratios(rows: list[dict]) -> None:
    """speedup = full time / time; memory_ratio = peak / full peak, same n, dtype and
    causality."""
    full = {(r["n"], r["dtype"], r["causal"]): r for r in rows if r["kind"] == "xla"}
    for r in rows:
        ref = full.get((r["n"], r["dtype"], r["causal"]))
        ok = ref is not None and ref["status"] == "ok" and r["status"] == "ok"
        r["speedup"] = ref["time_s"] / r["time_s"] if ok else float("nan")
        r["memory_ratio"] = r["peak_mb"] / ref["peak_mb"] if ref is not None else float("nan")


def slopes(rows: list[dict], lo: int = 2048, hi: int = 16384) -> dict:
    """Least-squares slope of log(time) against log(n) for lo <= n <= hi, per kind."""
    out = {}
    for kind in {r["kind"] for r in rows}:
        pts = [(r["n"], r["time_s"]) for r in rows
               if r["kind"] == kind and lo <= r["n"] <= hi and r["status"] == "ok"]
        if len(pts) >= 2:
            x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
            out[kind] = float(np.polyfit(x, y, 1)[0])
    return out


def write_csv(rows, path):
    fields = ["kind", "causal", "n", "dtype", "device", "time_s", "peak_mb", "speedup", "memory_ratio",
              "status", "load"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.8g}" if isinstance(r[k], float) else r[k]) for k in fields})


def _label(row) -> str:
    return f"{row['kind']} causal" if row["causal"] else row["kind"]


def _cell(r) -> str:
    if r is None:
        return ""
    if r["status"] != "ok":
        return f"— ({r['status']}; {r['peak_mb']:.0f} MB)"
    ratio = "" if math.isnan(r["speedup"]) else f" ({r['speedup']:.1f}×)"
    mem = "" if math.isnan(r["memory_ratio"]) else f" ({r['memory_ratio']:.3f})"
    return f"{r['time_s'] * 1e3:.0f} ms{ratio} / {r['peak_mb']:.0f} MB{mem}"


def _verdict(kind, by, slope) -> str:
    r = by.get((kind, TARGET_N))
    if kind not in LINEAR_KINDS or r is None or r["status"] != "ok":
        return ""
    if math.isnan(r["speedup"]):  # `xla` compiled (memory known) but too big to run here
        memory = "met" if r["memory_ratio"] <= TARGET_MEMORY else "missed"
        return f"memory {memory}; speed not measured (`xla` not run)"
    checks = [r["speedup"] >= TARGET_SPEEDUP, r["memory_ratio"] <= TARGET_MEMORY,
              slope is not None and slope <= TARGET_SLOPE]
    return "met" if all(checks) else "missed: " + ", ".join(
        name for name, ok in zip(("speed", "memory", "slope"), checks) if not ok)


def _table(rows, ns, causal: bool) -> list[str]:
    """One markdown table (a row per kind) of the rows with this causality."""
    by = {(r["kind"], r["n"]): r for r in rows if r["causal"] == causal}
    sl = slopes([r for r in rows if r["causal"] == causal])
    kinds = [k for k in KINDS + EXTRA_KINDS if any(key[0] == k for key in by)]
    lo, hi = max(min(ns), 2048), min(max(ns), 16384)   # as `slopes`
    span = f"{lo // 1024}K–{hi // 1024}K" if lo < hi else "2K–16K (not run)"
    head = ["variant", *[f"n={n}" for n in ns], f"slope {span}", "LRA 4K (TPU v3)",
            f"target @ {TARGET_N}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind in kinds:
        s = sl.get(kind)
        lra = None if causal else LRA_SPEEDUP_4K.get(kind)  # LRA's are encoder tasks
        lines.append("| " + " | ".join([
            f"`{kind}`", *[_cell(by.get((kind, n))) for n in ns],
            "" if s is None else f"{s:.2f}", "" if lra is None else f"{lra}×",
            _verdict(kind, by, s)]) + " |")
    return lines


def write_markdown(rows, path, dtype_name):
    rows = [r for r in rows if r["dtype"] == dtype_name]
    ns = sorted({r["n"] for r in rows})
    lines = [f"Forward+backward, batch 1, {HEADS} heads, head_dim {HEAD_DIM}, {dtype_name}, "
             f"{rows[0]['device']}. Cell: time (speed-up over full `xla` of the same "
             "causality) / peak memory (ratio to full). Slope: d log(time) / d log(n). Time: "
             f"best of interleaved passes; 1-min load average during the run "
             f"{rows[0].get('load', '(not recorded)')} "
             f"on {os.cpu_count()} cores (timings on a loaded machine are noisy; the memory "
             "figures are the compiled programs' and exact)."]
    for causal in sorted({r["causal"] for r in rows}):
        title = ("Causal (every kind whose registry entry accepts causal=True)" if causal
                 else "Bidirectional")
        lines += ["", f"### {title}", "", *_table(rows, ns, causal)]
    lines += ["", f"Targets (CPU): at n={TARGET_N} the linear-cost variants are ≥{TARGET_SPEEDUP:g}× "
              f"faster than `xla` with ≤1/{int(1 / TARGET_MEMORY)} of its peak memory, and their "
              f"time slope from 2048 to 16384 (or the longest n run) is ≤{TARGET_SLOPE}; `chunked` is "
              "exact with linearly growing memory, causal or not."]
    if any(r["kind"].startswith("splash") for r in rows) and "TPU" not in rows[0]["device"]:
        lines += ["", "Splash ran in Pallas interpret mode (no TPU): a functional check, its "
                  "times say nothing about TPU speed."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _plot_mode(axes, rows, title: str) -> None:
    """Time (axes[0]) and peak memory (axes[1]) against n, a line per kind."""
    for kind in [k for k in KINDS + EXTRA_KINDS if any(r["kind"] == k for r in rows)]:
        pts = sorted((r["n"], r["time_s"], r["peak_mb"]) for r in rows if r["kind"] == kind)
        ok = [p for p in pts if not math.isnan(p[1])]
        style = dict(marker="o", lw=2.5 if kind == "xla" else 1.5, label=kind,
                     color="black" if kind == "xla" else None)
        axes[0].plot([p[0] for p in ok], [p[1] for p in ok], **style)
        line = axes[1].plot([p[0] for p in ok], [p[2] for p in ok], **style)[0]
        skipped = [p for p in pts if math.isnan(p[1])]
        if skipped and ok:  # compiled but not run: it would not fit in memory
            xs, ys = [ok[-1][0], *[p[0] for p in skipped]], [ok[-1][2], *[p[2] for p in skipped]]
            axes[1].plot(xs, ys, ls="--", marker="o", mfc="white", markevery=list(range(1, len(xs))),
                         color=line.get_color(), lw=style["lw"], label=f"{kind} (not run: too big)")
    for ax, ylabel in zip(axes, ("forward+backward time [s]", "peak memory [MiB] (compiled)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    axes[0].set_title(f"{title}: time", fontsize=9)
    axes[1].set_title(f"{title}: peak memory of the compiled program (hollow: not run, "
                      "exceeds RAM)", fontsize=9)


def plot(rows, path, dtype_name):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["dtype"] == dtype_name]
    modes = sorted({r["causal"] for r in rows})
    fig, axes = plt.subplots(len(modes), 2, figsize=(13, 5.2 * len(modes)), squeeze=False)
    for ax_row, causal in zip(axes, modes):
        _plot_mode(ax_row, [r for r in rows if r["causal"] == causal],
                   "causal" if causal else "bidirectional")
    fig.suptitle(f"Attention scaling: batch 1, {HEADS} heads, head_dim {HEAD_DIM}, {dtype_name}, "
                 f"{rows[0]['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def read_csv(path) -> list[dict]:
    """Rows of a previous run, to redraw the table and plot without measuring again
    (a CSV from before the causal rows counts as bidirectional)."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["n"] = int(r["n"])
        r["causal"] = r.get("causal") == "True"
        for key in ("time_s", "peak_mb", "speedup", "memory_ratio"):
            r[key] = float(r[key])
    return rows


DTYPES = ("float32", "bfloat16", "float16")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-len", type=int, default=None, help="default 16384 (--tpu: 32768)")
    p.add_argument("--min-len", type=int, default=None, help="default 512 (--tpu: 1024)")
    p.add_argument("--tpu", action="store_true",
                   help=f"TPU mode: kinds {','.join(TPU_KINDS)}, bfloat16 on a TPU; elsewhere "
                        "splash runs in Pallas interpret mode (a slow functional check)")
    # Fresh runs go to runs/ (ignored by git): the committed reference tables in
    # experiments/results/ are replaced only when asked for by name.
    p.add_argument("--out", default="runs/attention_scaling",
                   help="where results.csv, scaling.png and table.md go (default: "
                        "runs/attention_scaling; the committed reference is "
                        "experiments/results/attention_scaling)")
    p.add_argument("--kinds", default=None,
                   help=f"comma-separated variant names, from {','.join(KINDS + EXTRA_KINDS)}")
    p.add_argument("--modes", default=None,
                   help="comma-separated: bidirectional,causal (default both; --tpu: bidirectional)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing passes (best kept)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="compute dtype (default: bfloat16 on GPU, TPU; else float32)")
    p.add_argument("--from-csv", default=None, help="redraw table.md and scaling.png from a CSV")
    return p


def _names(p, flag: str, text: str, valid: tuple) -> list[str]:
    """The comma-separated names of `flag`, each one of `valid` (else a usage error)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in valid]
    if bad or not names:
        p.error(f"{flag} {text!r}: each must be one of {', '.join(valid)}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, every one checked before anything is compiled or read: the defaults
    filled in (--kinds, --modes, --min-len, --max-len; --dtype from the backend) and
    `ns`, the lengths measured. A bad value is a usage error (one line, exit 2)."""
    p = _parser()
    args = p.parse_args(argv)
    check_output_dir(args.out, parser=p)
    if args.from_csv is not None:
        args.rows = _csv_rows(p, args.from_csv)
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: must be a positive integer (timing passes)")
    for flag, value in (("--min-len", args.min_len), ("--max-len", args.max_len)):
        if value is not None and value < 1:
            p.error(f"{flag} {value}: must be a positive integer (a sequence length)")
    args.min_len = args.min_len or (1024 if args.tpu else 512)
    args.max_len = args.max_len or (32768 if args.tpu else 16384)
    if args.min_len > args.max_len:
        p.error(f"--min-len {args.min_len} is above --max-len {args.max_len}; give "
                "--min-len <= --max-len")
    args.ns = [n for n in (2 ** i for i in range(30)) if args.min_len <= n <= args.max_len]
    if not args.ns:   # the lengths measured are powers of two
        p.error(f"--min-len {args.min_len} --max-len {args.max_len}: no power of two lies "
                "between them; widen the range (e.g. --min-len 512 --max-len 4096)")
    gpu = jax.default_backend() == "gpu"
    args.kinds = _names(p, "--kinds", args.kinds or ",".join(TPU_KINDS if args.tpu else KINDS),
                        KINDS + EXTRA_KINDS) + (["cudnn"] if gpu and not args.tpu else [])
    modes = _names(p, "--modes", args.modes or ("bidirectional" if args.tpu else ",".join(MODES)),
                   MODES)
    args.causals = [mode == "causal" for mode in MODES if mode in modes]
    tpu = jax.default_backend() == "tpu"
    args.dtype = args.dtype or ("bfloat16" if gpu or tpu else "float32")
    reason = registry.cudnn_unavailable_reason(args.dtype) if "cudnn" in args.kinds else None
    if reason:
        p.error(f"--kinds cudnn cannot run here: {reason}")
    config = bench_config(args.max_len)
    if not any(supports(k, config, c) for k in args.kinds for c in args.causals):
        p.error(f"--kinds {','.join(args.kinds)} --modes {','.join(modes)}: no kind runs in these "
                "modes here (e.g. linformer is bidirectional only)")
    return args


def _csv_rows(p, path: str) -> list[dict]:
    """The rows of --from-csv, or a usage error saying why they cannot be redrawn."""
    if not os.path.isfile(path):
        p.error(f"--from-csv {path!r} is not a file")
    try:
        rows = read_csv(path)
    except (OSError, UnicodeDecodeError, KeyError, ValueError, TypeError) as e:
        p.error(f"--from-csv {path!r} is not a results.csv of this script ({type(e).__name__}: {e})")
    if not rows:
        p.error(f"--from-csv {path!r} holds no rows")
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.from_csv:
        os.makedirs(args.out, exist_ok=True)
        write_markdown(args.rows, os.path.join(args.out, "table.md"), args.rows[0]["dtype"])
        plot(args.rows, os.path.join(args.out, "scaling.png"), args.rows[0]["dtype"])
        return
    dtype = jnp.dtype(args.dtype)
    kinds, ns, causals = args.kinds, args.ns, args.causals
    config = bench_config(args.max_len)
    os.makedirs(args.out, exist_ok=True)
    cases = []
    for n in ns:
        rng = np.random.default_rng(n)
        q, k, v = (jnp.asarray(rng.standard_normal((1, n, HEADS, HEAD_DIM)), dtype) for _ in range(3))
        ct = jnp.asarray(rng.standard_normal((1, n, HEADS, HEAD_DIM)), jnp.float32)
        for causal in causals:
            for kind in [k for k in kinds if supports(k, config, causal)]:
                cases.append(prepare(kind, n, config, dtype, (q, k, v, ct), causal))
                row = cases[-1]["row"]
                print(f"compiled {_label(row):>19} n={n:>6} peak {row['peak_mb']:10.1f} MB "
                      f"{row['status']}", flush=True)
    load = os.getloadavg()[0]
    measure_rounds(cases, args.rounds)
    rows = [c["row"] for c in cases]
    for r in rows:
        r["load"] = f"{load:.1f}-{os.getloadavg()[0]:.1f}"
    add_ratios(rows)
    name = jnp.dtype(dtype).name
    write_csv(rows, os.path.join(args.out, "results.csv"))
    write_markdown(rows, os.path.join(args.out, "table.md"), name)
    plot(rows, os.path.join(args.out, "scaling.png"), name)
    print(open(os.path.join(args.out, "table.md")).read())


if __name__ == "__main__":
    main()
