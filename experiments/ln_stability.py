"""The LN-stability benchmark: post-LN vs pre-LN (Xiong et al. 2020, arXiv 2002.04745).

    python -m experiments.ln_stability --preset quick        # minutes on 2 CPU cores, offline
    python -m experiments.ln_stability --preset quick --seeds 10,11,12   # another seed set
    python -m experiments.ln_stability --preset gpu          # ~10 min on one H100/H200 or TPU v5e
    python -m experiments.ln_stability --preset micro --out /tmp/ln-micro   # seconds (tests)

Four parts (see experiments/ln/): (a) per-layer gradient norms at initialization
for five placements and several depths; (b) a training sweep over placement x
warm-up x peak learning rate x seed for translation (encoder-decoder), BERT
(MLM + NSP, reported apart) and, in larger presets, GPT (LM); (c) each
(task, placement) of that sweep is one `jax.vmap`ped program, checked against runs
done one by one; (d) JSONL records, CSVs, plots and `report.md` with verdicts.
Re-running with the same --out skips the work already recorded there. Results go
to runs/ln_stability/<preset>/ by default; experiments/results/quick/ holds the
committed reference output of the quick preset. A time estimate (from a FLOP count
and the preset's assumed device rate) is printed at start.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path


def _cpu_devices(environ=os.environ) -> None:
    """One virtual XLA:CPU device per core, up to 8, unless XLA_FLAGS already says how
    many: XLA:CPU runs one device's program on about one core, so the sweep's run axis
    (sharded over the local devices) and the gradient study's programs (one per
    device) then use every core. No effect on GPUs and TPUs. Before JAX starts only."""
    flags = environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        count = min(8, os.cpu_count() or 1)
        environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


if __name__ == "__main__":   # the command, not an import (JAX may be running already)
    _cpu_devices()

import jax  # noqa: E402  (after _cpu_devices)

from experiments.ln import bench, records, report
from experiments.ln.presets import PRESETS, get_preset
from transformer_jax.run.files import check_output_dir

# Fresh runs go to runs/ (ignored by git); experiments/results/<preset> holds the
# committed reference output, which a run with `--out` there would only re-report.
DEFAULT_OUT = Path("runs") / "ln_stability"


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds={text!r}: expected comma-separated "
                                         "non-negative integers, e.g. 10,11,12") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds={text!r}: seeds must be distinct and >= 0")
    return seeds


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    parser.add_argument("--out", type=Path, default=None,
                        help="results directory (default: runs/ln_stability/<preset>; the committed "
                             "reference output is in experiments/results/<preset>)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="tokenizer cache (default: <out>/.cache)")
    parser.add_argument("--seeds", type=_seeds, default=None,
                        help="comma-separated seeds replacing the preset's in every part, e.g. "
                             "10,11,12 (default out: runs/ln_stability/<preset>-seeds-10-11-12)")
    parser.add_argument("--quiet", action="store_true", help="only section-level progress lines")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild report, CSVs and plots from the records; run nothing")
    return parser


def _directory(parser, flag: str, path: Path, create: bool) -> None:
    """`path` is usable as the directory `flag` names (made if `create`), or the
    command stops with a usage error that says why (exit status 2, no traceback)."""
    check_output_dir(path, flag, parser)
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            parser.error(f"{flag} {str(path)!r}: cannot create the directory ({e.strerror})")


def _has_records(preset, out: Path) -> bool:
    results = report.load(preset, out)
    return bool(results.gradnorm or results.runs)


def main(argv=None) -> Path:
    parser = _parser()
    args = parser.parse_args(argv)
    preset = get_preset(args.preset)
    name = preset.name
    if args.seeds is not None:
        try:
            preset = preset.with_seeds(args.seeds)
        except ValueError as e:   # too few seeds for the preset's largest part
            parser.error(f"--seeds {','.join(map(str, args.seeds))}: {e}")
        name += "-seeds-" + "-".join(map(str, args.seeds))
    out = args.out or DEFAULT_OUT / name
    cache = args.cache_dir or out / ".cache"
    # Both checked before --out is made: a refused --cache-dir leaves no empty --out.
    _directory(parser, "--out", out, create=False)
    _directory(parser, "--cache-dir", cache, create=False)
    if not args.report_only:
        _directory(parser, "--out", out, create=True)
    if args.report_only and not _has_records(preset, out):
        committed = Path(__file__).parent / "results" / name
        other = any((out / f).exists() for f in (records.RUNS, records.GRADNORM))
        parser.error(f"--report-only: no records of preset {name!r} (its current settings) in "
                     f"{str(out)!r}" + (" (those there are of other settings: another preset, "
                                        "--seeds or version)" if other else "") +
                     "; run without --report-only first, or give --out a results directory "
                     "of this preset" + (f" (the committed one: experiments/results/{name})"
                                         if committed.is_dir() else ""))
    log = bench.Log(args.quiet)
    start, cpu0 = time.perf_counter(), _cpu_s()
    ran = False
    if not args.report_only:
        log(f"preset {preset.name} -> {out}")
        log(bench.estimate_line(preset))
        try:
            ran = bench.run_gradnorm(preset, out, cache, log)
            for sweep in preset.sweeps:
                ran = bench.run_sweep(preset, sweep, out, cache, log) or ran
        except KeyboardInterrupt:   # Ctrl-C, a notebook's stop button, timeout -s INT
            # Each record is appended whole once its program has run, so what finished
            # is kept; the interrupted program's runs are redone.
            print(f"ln_stability: interrupted; the records written so far are kept in "
                  f"{str(out)!r}: rerun the same command to continue", file=sys.stderr)
            raise
    if not args.report_only and not ran:
        log("every record was present: nothing ran; the report is rebuilt with the "
            "recorded timing (timing.json) kept")
    # Only an invocation that trained something times it: a rerun over a finished
    # directory (the committed reference included) must not replace its timing by ~1 s.
    timing = None if not ran else {
        "wall_s": time.perf_counter() - start, "cpu_s": _cpu_s() - cpu0,
        "args": "" if args.seeds is None else f" --seeds {','.join(map(str, args.seeds))}",
        "machine": f"JAX {jax.__version__}, backend {jax.default_backend()} "
                   f"({jax.local_device_count()} devices), {os.cpu_count()} CPU cores, "
                   f"load average {os.getloadavg()[0]:.1f} at the end"}
    path = report.write_report(preset, out, timing)
    log(f"report: {path}")
    return path


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:   # main said what is kept; no traceback for a Ctrl-C
        sys.exit(130)
