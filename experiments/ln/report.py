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

from experiments.ln import bleu, plots, records, verdicts
from experiments.ln.analysis import PLATEAU_MARGIN, SPIKE_NATS, SPIKE_WINDOW, steps_to_target
from experiments.ln.bench import CHECK_TOLERANCE, read_checks
from experiments.ln.presets import Preset
from experiments.ln.verdicts import TASK_NAMES

SUMMARY_FIELDS = ("run_id", "task", "placement", "peak_lr", "warmup", "decay", "seed", "steps",
                  "initial_val_loss", "final_val_loss", "best_val_loss", "unigram_loss",
                  "final_val_accuracy", "final_val_nsp_loss", "final_val_nsp_accuracy", "bleu",
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
                   read_checks(out, sweep_fps))


def _targets(runs: list[dict]) -> dict[str, float]:
    """Per task, the loss runs are timed to: the best final loss of post-LN with
    warm-up (verdicts.speed), where those runs learned."""
    out = {}
    for task in sorted({r["task"] for r in runs}):
        info = verdicts.speed(runs, task)[2]
        if info:
            out[task] = info["target"]
    return out


def write_csvs(results: Results, out: Path) -> None:
    targets = _targets(results.runs)
    with (out / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, SUMMARY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in results.runs:
            target = targets.get(r["task"])
            finals = {f"final_{k}": v[-1] for k, v in r.items()
                      if k.startswith("val_") and k != "val_steps" and v}
            writer.writerow({**r, **finals, "target_loss": target, "steps_to_target":
                             None if target is None else steps_to_target(r, target)})
    with (out / "gradnorm.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["placement", "depth", "seed", "stack", "layer", "w2", "w1",
                         "attention"])
        for r in results.gradnorm:
            for i in range(len(r["w2"])):
                stack = r.get("stacks", ["stack"])[i // r["depth"]]
                writer.writerow([r["placement"], r["depth"], r["seed"], stack, i % r["depth"],
                                 r["w2"][i], r["w1"][i], r["attention"][i]])


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def gradnorm_table(rows: list[dict]) -> str:
    tops = verdicts.top_layer_means(rows)
    placements = list(dict.fromkeys(r["placement"] for r in rows))
    depths = sorted({r["depth"] for r in rows})
    body = [[p] + [verdicts.fmt(tops.get((p, d), [])) for d in depths] for p in placements]
    return _table(["placement"] + [f"L={d}" for d in depths], body)


def _finals(c: list[dict], key: str) -> list:
    return [r[key][-1] for r in c if r.get(key)]


def sweep_table(runs: list[dict], task: str) -> str:
    """Rows (placement, warm-up, decay), columns peak lr: final val loss (+ accuracy)
    and failures."""
    t_runs = [r for r in runs if r["task"] == task]
    lrs = sorted({r["peak_lr"] for r in t_runs})
    body = []
    for placement in sorted({r["placement"] for r in t_runs}):
        for wu, decay in verdicts.arms(t_runs):
            row = [placement, wu, decay]
            for lr in lrs:
                c = verdicts.cell(t_runs, task, placement, lr, wu, decay)
                fails = sum(map(verdicts.failed, c))
                acc = verdicts.fmt(_finals(c, "val_accuracy"), 2)
                score = f", BLEU {verdicts.fmt(verdicts.bleus(c), 2)}" if verdicts.bleus(c) else ""
                row.append(f"{verdicts.fmt([r['final_val_loss'] for r in c])}, acc {acc}{score} "
                           f"({fails}/{len(c)} failed)" if c else "-")
            body.append(row)
    return _table(["placement", "warm-up", "decay"] + [f"lr {lr:g}" for lr in lrs], body)


def best_table(runs: list[dict], task: str) -> str:
    """Each placement at its best setting (the paper's framing of claims 2b and 3)."""
    t_runs = [r for r in runs if r["task"] == task]
    info = verdicts.speed(runs, task)[2]
    target = info.get("target")
    warm = sorted({r["warmup"] for r in t_runs if r["warmup"]})
    scored = bool(verdicts.bleus(t_runs))
    body = []
    for placement in dict.fromkeys(r["placement"] for r in t_runs):
        for label, warmups in (("any", None), ("none", [0]), ("with warm-up", warm)):
            key, c = verdicts.best_cell(t_runs, task, placement, warmups)
            if not c:
                continue
            steps = verdicts.steps_to(c, target) if target is not None else None
            body.append([placement, label, f"lr {key[0]:g}, {verdicts.arm_label(*key[1:])}",
                         verdicts.fmt([r["final_val_loss"] for r in c]),
                         verdicts.fmt(_finals(c, "val_accuracy"), 2)]
                        + ([verdicts.fmt(verdicts.bleus(c), 2)] if scored else [])
                        + ["n/a" if target is None else (steps if steps is not None else "never"),
                           sum(map(verdicts.failed, c))])
    header = ["placement", "warm-up allowed", "best setting", "final val loss", "accuracy",
              *(["BLEU"] if scored else []),
              "steps to target" + (f" {target:.3f}" if target is not None else ""), "failed"]
    return _table(header, body)


def equal_lr_table(runs: list[dict], task: str) -> str:
    rows = verdicts.equal_lr_rows(runs, task)
    return _table(["peak lr", "post-LN best schedule", "post-LN final", "pre-LN (no warm-up) "
                   "best decay", "pre-LN final", "post-LN steps to its final",
                   "pre-LN steps to it"], rows)


def mlm_table(runs: list[dict]) -> str:
    """BERT's two losses apart, per (placement, lr, warm-up), with the MLM baseline."""
    m = [r for r in runs if r["task"] == "mlm"]
    keys = sorted({(r["placement"], r["peak_lr"], r["warmup"], r["decay"]) for r in m})
    body = []
    for placement, lr, wu, decay in keys:
        c = verdicts.cell(m, "mlm", placement, lr, wu, decay)
        body.append([placement, f"{lr:g}", wu, verdicts.fmt([r["final_val_loss"] for r in c]),
                     f"{m[0]['unigram_loss'] - np.mean([r['final_val_loss'] for r in c]):+.2f}"
                     if all(r["final_val_loss"] is not None for r in c) else "n/a",
                     verdicts.fmt(_finals(c, "val_accuracy"), 2),
                     verdicts.fmt(_finals(c, "val_nsp_loss")),
                     verdicts.fmt(_finals(c, "val_nsp_accuracy"), 2)])
    return _table(["placement", "peak lr", "warm-up", "MLM loss", "below unigram", "MLM acc",
                   "NSP loss", "NSP acc"], body)


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
    compilation plus R times the mean time of a run, in wall and in CPU seconds;
    against the vmapped group's times, measured in the same loop."""
    first = checks[0]
    runs = first["group_runs"]
    wall = first["compile_s"] + runs * np.mean([c["run_s"] for c in checks])
    cpu = first["compile_cpu_s"] + runs * np.mean([c["cpu_s"] for c in checks])
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
    every = checks[0]["resync_every"]
    return (f"**vmap vs one by one:** the {s['runs']} runs of `{group}` took "
            f"{s['vmapped_s']:.1f} s wall ({s['vmapped_cpu_s']:.0f} s CPU) as one vmapped "
            f"program; one by one, reusing one compiled unbatched program, they would take "
            f"{s['sequential_s']:.1f} s wall ({s['sequential_cpu_s']:.0f} s CPU), extrapolated "
            f"from {s['measured_runs']} runs timed alone, chunk by chunk between the group's: "
            f"speed-up **{s['speedup']:.2f}x** in wall time, {s['cpu_speedup']:.2f}x in CPU "
            f"time. Same seeds, each {every}-step chunk of the one-by-one run started from the "
            f"vmapped run's state: max |difference| in loss {s['max_abs_diff']:.1e} "
            f"(tolerance {CHECK_TOLERANCE:g}): {'passed' if s['passed'] else 'FAILED'}. "
            "Re-synchronised, because training is chaotic: two free-running copies drift "
            "apart from their first 1-ulp difference (XLA fuses the two programs "
            "differently), as any two implementations would (docs/ln_experiment.md). "
            "On a CPU the arithmetic is the same either way: the batched program gains only by "
            "dispatching once per step for all runs and by keeping every core busy, so the gain "
            "is modest. A small model cannot fill an accelerator, where the gain "
            "should be larger.")


def _width(w) -> str:
    init = f"init {w.init}" + (f" (std {w.init_std:g})" if w.init == "normal" else "")
    return f"d_model {w.d_model}, {w.num_heads} heads, d_ff {w.d_ff}, {init}"


def _settings(preset: Preset) -> list[str]:
    g = preset.gradnorm
    lines = [f"- data: the default corpus ({preset.corpus_chars or 'all'} chars), vocabulary "
             f"{preset.vocab_size}, sequence length {preset.seq_len} unless stated",
             f"- gradient norms at init: {g.task} model ({TASK_NAMES[g.task]}), {_width(g.width)}, "
             f"{', '.join(f'{d}' for d in g.depths)} layers per stack, seeds {list(g.seeds)}, "
             f"gradient averaged over {g.batches} mini-batches of {g.batch_size}"]
    for s in preset.sweeps:
        lines.append(
            f"- sweep {s.task} ({TASK_NAMES[s.task]}): {s.num_layers} layers"
            f"{' per stack' if s.task == 'seq2seq' else ''}, {_width(s.width)}, sequence "
            f"{s.seq_len or preset.seq_len}; placements {list(s.placements)}; peak lr "
            f"{list(s.peak_lrs)}; warm-up {list(s.warmups)}; seeds {list(s.seeds)}; {s.steps} "
            f"steps of batch {s.batch_size}, linear warm-up then {s.decay} "
            f"(`training.schedules`){_extra_arms(s)}; AdamW b1 {s.b1}, b2 {s.b2}, weight decay "
            f"{s.weight_decay}, no clipping, dropout 0")
    lines.append(f"- a run *did not learn* if it diverged (a non-finite loss/gradient, or a "
                 f"validation loss above its initial value) or never got {PLATEAU_MARGIN} nats "
                 f"below the unigram baseline; a *spike* is a training loss more than "
                 f"{SPIKE_NATS:g} nat above the median of the previous {SPIKE_WINDOW} "
                 f"(`training.divergence`; consecutive spike steps count once)")
    return lines


def _extra_arms(s) -> str:
    if not s.extra_arms:
        return ""
    drop = (f"; drop: the lr constant, x0.1 from update {s.drop_step} (Xiong et al.'s pre-LN "
            "schedule, sec. 4.1: x0.1 at the 8th epoch)") if "drop" in s.decays else ""
    return (", and beside them " + ", ".join(_arm_text(*a) for a in s.extra_arms)
            + " for every placement" + drop)


def _arm_text(warmup: int, decay: str) -> str:
    return f"{decay} with warm-up {warmup}" if warmup else f"{decay} without warm-up"


def _bleu_note(sweep, runs) -> list[str]:
    if not sweep.bleu_batches:
        return []
    if not verdicts.bleus([r for r in runs if r["task"] == sweep.task]):
        return [f"{bleu.MISSING}.", ""]
    return [f"BLEU: corpus BLEU-4 (sacrebleu, `tokenize=\"none\"`, on target token ids) of the "
            f"final parameters' greedy translations of the first "
            f"{sweep.bleu_batches * sweep.batch_size} validation sentences, one reference each "
            "(`experiments/ln/bleu.py`).", ""]


def _task_sections(preset: Preset, results: Results) -> list[str]:
    out = []
    for sweep in preset.sweeps:
        task, runs = sweep.task, results.runs
        if not any(r["task"] == task for r in runs):
            continue
        unigram = next(r["unigram_loss"] for r in runs if r["task"] == task)
        metric = "MLM loss" if task == "mlm" else "loss"
        out += [f"## {TASK_NAMES[task]} (`{task}`)", "",
                f"Unigram baseline of the validation {metric}: {unigram:.3f}.", ""]
        out += _bleu_note(sweep, runs)
        out += [
                "Each placement at its best setting; *steps to target*: the first evaluation "
                "at which the setting's seed-mean validation curve reaches post-LN-with-warm-up's "
                "best final loss:", "", best_table(runs, task), "",
                "Equal learning rates (secondary; the paper's \"same lr_max\", sec. 4.2): "
                "post-LN with its best warm-up vs pre-LN without warm-up on its best decay, "
                "at each peak lr:", "", equal_lr_table(runs, task), "",
                f"Every cell: final validation {metric}, {verdicts.SPREAD_TEXT}, token accuracy "
                "(runs that did not learn):", "", sweep_table(runs, task), ""]
        if task == "mlm":
            out += ["MLM and NSP apart (BERT trains on their sum; NSP is an uninformed "
                    "ln 2 = 0.693 at the start):", "", mlm_table(runs), ""]
    return out


def markdown(preset: Preset, results: Results, figures: list[str], timing: dict | None) -> str:
    claims = verdicts.all_verdicts(results.gradnorm, results.runs)
    out = [f"# LN-stability benchmark, preset `{preset.name}`", "",
           "Reproducing Xiong et al. 2020, *On Layer Normalization in the Transformer "
           "Architecture* (arXiv 2002.04745), at a small scale.", ""]
    out += [f"Command: `python -m experiments.ln_stability --preset {preset.name}"
            f"{timing.get('args', '') if timing else ''}`.", ""]
    if timing:
        out += [f"This invocation: {timing['wall_s']:.0f} s wall, {timing['cpu_s']:.0f} s CPU "
                "(user + sys, all threads; work already recorded in the directory was "
                f"skipped); {timing.get('machine', 'machine not recorded')}.", ""]
    out += ["## Verdicts", "", _table(["claim", "verdict"], [[v.claim.split(" ")[0], v.status]
                                                             for v in claims]), ""]
    for v in claims:
        out += [f"**{v.claim}** — *{v.status}*", ""] + [f"- {e}" for e in v.evidence] + [""]
    out += ["## Settings", ""] + _settings(preset) + [""]
    out += ["## Gradient norms at initialization",
            "", "Last layer's |mean dL/dW2| (FFN output kernel, `mlp/down`, of the layer next "
            f"to the output), {verdicts.SPREAD_TEXT}:", "",
            gradnorm_table(results.gradnorm), ""]
    out += _task_sections(preset, results)
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
