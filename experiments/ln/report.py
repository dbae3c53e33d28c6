"""Results directory -> summary.csv, gradnorm.csv, plots and report.md.

Everything here reads the JSONL records only, so `--report-only` rebuilds the
report of a finished (or interrupted) run without training anything.
"""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np

from experiments.ln import plots, records, verdicts
from experiments.ln.analysis import PLATEAU_MARGIN, SPIKE_FACTOR, SPIKE_WINDOW, steps_to_target
from experiments.ln.bench import CHECK_TOLERANCE
from experiments.ln.presets import Preset

SUMMARY_FIELDS = ("run_id", "task", "placement", "peak_lr", "warmup", "seed", "steps",
                  "initial_val_loss", "final_val_loss", "best_val_loss", "unigram_loss",
                  "escaped_plateau", "diverged", "diverged_at", "diverge_reason", "num_spikes",
                  "nonfinite_steps", "max_grad_norm", "target_loss", "steps_to_target")


@dataclasses.dataclass
class Results:
    gradnorm: list[dict]
    runs: list[dict]
    groups: list[dict]
    checks: list[dict]


def load(preset: Preset, out: Path) -> Results:
    sweep_fps = [preset.fingerprint(s) for s in preset.sweeps]
    return Results(records.read(out, records.GRADNORM, [preset.fingerprint(preset.gradnorm)]),
                   records.read(out, records.RUNS, sweep_fps),
                   records.read(out, records.GROUPS, sweep_fps),
                   records.read(out, records.CHECKS, sweep_fps))


def _targets(runs: list[dict]) -> dict[str, float]:
    """Per task, the loss runs are timed to: the worst final loss of post-LN with the
    longest warm-up at its best learning rate, if none of those runs failed (see
    verdicts.speed)."""
    out = {}
    for task in sorted({r["task"] for r in runs}):
        t_runs = [r for r in runs if r["task"] == task]
        wu = max(r["warmup"] for r in t_runs)
        lr = verdicts._best_lr(t_runs, task, "post", wu)
        if lr is not None:
            c = verdicts.cell(t_runs, task, "post", lr, wu)
            if not any(map(verdicts.failed, c)):
                out[task] = max(r["val_loss"][-1] for r in c)
    return out


def write_csvs(results: Results, out: Path) -> None:
    targets = _targets(results.runs)
    with (out / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, SUMMARY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in results.runs:
            target = targets.get(r["task"])
            writer.writerow({**r, "target_loss": target, "steps_to_target":
                             None if target is None else steps_to_target(r, target)})
    with (out / "gradnorm.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["placement", "depth", "seed", "layer", "w2", "w1", "attention"])
        for r in results.gradnorm:
            for i in range(r["depth"]):
                writer.writerow([r["placement"], r["depth"], r["seed"], i, r["w2"][i],
                                 r["w1"][i], r["attention"][i]])


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def gradnorm_table(rows: list[dict]) -> str:
    tops = verdicts.top_layer_means(rows)
    placements = list(dict.fromkeys(r["placement"] for r in rows))
    depths = sorted({r["depth"] for r in rows})
    body = [[p] + [verdicts.fmt(tops.get((p, d), [])) for d in depths] for p in placements]
    return _table(["placement"] + [f"L={d}" for d in depths], body)


def sweep_table(runs: list[dict], task: str) -> str:
    """Rows (placement, warm-up), columns peak lr: final val loss and failures."""
    t_runs = [r for r in runs if r["task"] == task]
    lrs = sorted({r["peak_lr"] for r in t_runs})
    keys = sorted({(r["placement"], r["warmup"]) for r in t_runs})
    body = []
    for placement, wu in keys:
        row = [placement, wu]
        for lr in lrs:
            c = verdicts.cell(t_runs, task, placement, lr, wu)
            fails = sum(map(verdicts.failed, c))
            spikes = sum(r["num_spikes"] for r in c)
            row.append(f"{verdicts.fmt([r['final_val_loss'] for r in c])} "
                       f"({fails}/{len(c)} failed, {spikes} spikes)")
        body.append(row)
    return _table(["placement", "warm-up"] + [f"lr {lr:g}" for lr in lrs], body)


def vmap_section(results: Results) -> str:
    lines = []
    groups = [[g["task"], g["placement"], g["runs"], f"{g['compile_s']:.1f}", f"{g['run_s']:.1f}",
               f"{g['cpu_s']:.1f}"] for g in results.groups]
    if groups:
        lines.append(_table(["task", "placement", "runs", "init+compile s", "train s", "CPU s"],
                            groups))
    checks = results.checks
    if checks:
        lines.append("")
        lines.append(_table(
            ["run (one by one)", "max abs diff train loss", "max abs diff val loss", "passed",
             "init+compile s", "train s"],
            [[c["run_id"], f"{c['max_abs_diff_train_loss']:.2e}",
              f"{c['max_abs_diff_val_loss']:.2e}", c["passed"], f"{c['compile_s']:.1f}",
              f"{c['run_s']:.1f}"] for c in checks]))
        lines.append("\n" + speedup_text(checks))
    return "\n".join(lines) or "No vmapped groups recorded."


def speedup(checks: list[dict]) -> dict:
    """The group's R runs one by one, extrapolated from the runs timed alone: one
    compilation (the run that compiled) plus R times the mean time of a run, in wall
    and in CPU seconds; against the vmapped group's measured times."""
    first = max(checks, key=lambda c: c["compile_s"])
    others = [c for c in checks if c is not first] or [first]
    runs = first["group_runs"]
    wall = first["compile_s"] + runs * np.mean([c["run_s"] for c in checks])
    cpu = first["cpu_s"] + (runs - 1) * np.mean([c["cpu_s"] for c in others])
    vmapped = first["group_compile_s"] + first["group_run_s"]
    return {"runs": runs, "measured_runs": len(checks),
            "sequential_s": float(wall), "vmapped_s": float(vmapped),
            "speedup": float(wall / vmapped),
            "sequential_cpu_s": float(cpu), "vmapped_cpu_s": float(first["group_cpu_s"]),
            "cpu_speedup": float(cpu / first["group_cpu_s"]),
            "max_abs_diff": max(max(c["max_abs_diff_train_loss"], c["max_abs_diff_val_loss"])
                                for c in checks),
            "passed": all(c["passed"] for c in checks)}


def speedup_text(checks: list[dict]) -> str:
    s = speedup(checks)
    group = checks[0]["run_id"].rsplit("/", 3)[0]
    return (f"**vmap vs one by one:** the {s['runs']} runs of `{group}` took "
            f"{s['vmapped_s']:.1f} s wall ({s['vmapped_cpu_s']:.0f} s CPU) as one vmapped "
            f"program; one by one, reusing one compiled unbatched program, they would take "
            f"{s['sequential_s']:.1f} s wall ({s['sequential_cpu_s']:.0f} s CPU), extrapolated "
            f"from {s['measured_runs']} runs timed alone: speed-up **{s['speedup']:.2f}x** in "
            f"wall time, "
            f"{s['cpu_speedup']:.2f}x in CPU time. Same seeds, same results: max |difference| in "
            f"loss {s['max_abs_diff']:.1e} (tolerance {CHECK_TOLERANCE:g}): "
            f"{'passed' if s['passed'] else 'FAILED'}. The checked runs are at the lowest learning "
            "rate: where training is chaotic, 1-ulp differences between the two compiled programs "
            "(XLA fuses them differently) grow, as they would between any two implementations. "
            "On a CPU the arithmetic is the same either way: the batched program gains only by "
            "dispatching once per step for all runs and by keeping every core busy, so the gain "
            "is modest, and on a shared machine the two timings (taken minutes apart) move with "
            "other processes' load. A small model cannot fill an accelerator, where the gain "
            "should be larger.")


def _settings(preset: Preset) -> list[str]:
    g = preset.gradnorm
    lines = [f"- data: stdlib docstrings ({preset.corpus_chars or 'all'} chars), vocabulary "
             f"{preset.vocab_size}, sequence length {preset.seq_len}",
             f"- gradient norms at init: {g.task} model, d_model {g.width.d_model}, "
             f"{g.width.num_heads} heads, d_ff {g.width.d_ff}, init std {g.width.init_std:g}, "
             f"depths {list(g.depths)}, seeds {list(g.seeds)}, batch {g.batch_size}"]
    for s in preset.sweeps:
        lines.append(
            f"- sweep {s.task}: {s.num_layers} layers, d_model {s.width.d_model}, "
            f"{s.width.num_heads} heads, d_ff {s.width.d_ff}, init std {s.width.init_std:g}; "
            f"placements {list(s.placements)}; peak lr {list(s.peak_lrs)}; warm-up "
            f"{list(s.warmups)}; seeds {list(s.seeds)}; {s.steps} steps of batch "
            f"{s.batch_size}, {s.decay} decay after warm-up; AdamW b1 {s.b1}, b2 {s.b2}, "
            f"weight decay {s.weight_decay}, no clipping, dropout 0")
    lines.append(f"- a run *failed* if it diverged (a non-finite loss/gradient, or a validation "
                 f"loss above its initial value) or never got {PLATEAU_MARGIN} nats below the "
                 f"unigram baseline; a *spike* is a training loss above {SPIKE_FACTOR}x the "
                 f"median of the previous {SPIKE_WINDOW}")
    return lines


def markdown(preset: Preset, results: Results, figures: list[str], timing: dict | None) -> str:
    tasks = [s.task for s in preset.sweeps]
    claims = [*verdicts.claim1(results.gradnorm), *verdicts.claim2(results.runs, tasks),
              verdicts.claim3(results.runs)]
    out = [f"# LN-stability benchmark, preset `{preset.name}`", "",
           "Reproducing Xiong et al. 2020, *On Layer Normalization in the Transformer "
           "Architecture* (arXiv 2002.04745), at a small scale.", ""]
    out += [f"Command: `python -m experiments.ln_stability --preset {preset.name}`.", ""]
    if timing:
        out += [f"This invocation: {timing['wall_s']:.0f} s wall, {timing['cpu_s']:.0f} s CPU "
                "(all threads; work already recorded in the directory was skipped); "
                f"{timing.get('machine', 'machine not recorded')}.", ""]
    out += ["## Verdicts", ""]
    for v in claims:
        out += [f"**{v.claim}** — *{v.status}*", ""] + [f"- {e}" for e in v.evidence] + [""]
    out += ["## Settings", ""] + _settings(preset) + [""]
    out += ["## Gradient norms at initialization",
            "", "Last layer's |dL/dW2| (FFN output kernel, `mlp/down`), mean ± std over seeds:",
            "",
            gradnorm_table(results.gradnorm), ""]
    for task in tasks:
        out += [f"## Training sweep: {task}", "",
                "Final validation loss, mean ± std over seeds (failed runs, spikes):", "",
                sweep_table(results.runs, task), ""]
    out += ["## Many runs per compiled program (jax.vmap)", "", vmap_section(results), ""]
    out += ["## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures] + [""]
    out += ["Files: `runs.jsonl` (one record per training run, with curves), `summary.csv`, "
            "`gradnorm.jsonl` / `gradnorm.csv`, `groups.jsonl` and `checks.jsonl` (timings, "
            "vmap check)."]
    return "\n".join(out) + "\n"


def write_report(preset: Preset, out: Path, timing: dict | None = None) -> Path:
    out = Path(out)
    results = load(preset, out)
    write_csvs(results, out)
    figures = plots.write_all(results, out)
    if timing:
        (out / "timing.json").write_text(json.dumps(timing, indent=1) + "\n")
    elif (out / "timing.json").exists():
        timing = json.loads((out / "timing.json").read_text())
    path = out / "report.md"
    path.write_text(markdown(preset, results, figures, timing))
    return path
