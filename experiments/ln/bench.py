"""The benchmark's two studies, resumable: what runs, in which order, what is written.

    gradnorm study   per (placement, depth): all seeds in one program   -> gradnorm.jsonl
    sweep            per (task, placement): one vmapped program       -> runs.jsonl, groups.jsonl
    check            a few runs again one by one, each chunk from the   -> checks.jsonl
                     vmapped state (during the first placement's group)

Work whose records (with the current settings' fingerprint) are already in the
results directory is skipped.
"""
from __future__ import annotations

import concurrent.futures
import functools
import time
from pathlib import Path

import jax
import numpy as np

from experiments.ln import analysis, bleu, records
from experiments.ln.data import load_task_data
from experiments.ln.gradnorm import measure
from experiments.ln.presets import Preset, Sweep, model_config, sweep_config
from experiments.ln.sweep import RunSpec, cached_model, group_specs, run_group
from transformer_jax.training.metrics import count_params, model_flops_per_token

# Equality of vmapped and one-by-one runs, in loss (the tolerance).
CHECK_TOLERANCE = 1e-4
# Records of other check methods (free-running copies, before) are not reused.
CHECK_METHOD = "resynced"


def read_checks(out_dir: Path, fingerprints) -> list[dict]:
    """The check records of these settings made by the current CHECK_METHOD."""
    return [r for r in records.read(out_dir, records.CHECKS, fingerprints)
            if r.get("method") == CHECK_METHOD]


class Log:
    """Progress lines with the elapsed time; `quiet` keeps only the section lines."""

    def __init__(self, quiet: bool = False):
        self.start, self.quiet = time.perf_counter(), quiet

    def __call__(self, message: str, detail: bool = False) -> None:
        if not (detail and self.quiet):
            print(f"[{time.perf_counter() - self.start:7.1f}s] {message}", flush=True)


@functools.lru_cache(maxsize=256)
def _count(config) -> int:
    """Parameters (position tables excluded), counted on the scanned twin of `config`:
    the same parameters stacked on a layer axis, but tracing one layer instead of
    all of them (an unscanned 24-24 trace takes seconds)."""
    from transformer_jax.training.state import init_params   # models are heavy; lazy
    scanned = config.replace(scan_layers=True)
    params = jax.eval_shape(lambda k: init_params(scanned, k)[0], jax.random.key(0))
    return count_params(params, exclude_position=True)


def _num_params(config) -> int:
    """`_count(config)`, from two counts shared by every depth: each layer of a stack has
    the same parameters, so the count is linear in depth, and the 1- and 2-layer models
    (both stacks at once for an encoder-decoder) give it. `estimate` counts every model
    of every preset, most of them differing only in depth."""
    depths = {config.num_layers, getattr(config, "num_decoder_layers", config.num_layers)}
    if len(depths) > 1:   # stacks of different depths: counted as they are
        return _count(config)
    at = lambda n: _count(config.replace(num_layers=n, **(
        {"num_decoder_layers": n} if hasattr(config, "num_decoder_layers") else {})))
    return at(1) + (config.num_layers - 1) * (at(2) - at(1))


def _flops_per_token(preset, task, placement, layers, width, seq) -> float:
    config = model_config(preset, task, placement, layers, width, seq)
    return float(model_flops_per_token(config, config.max_len, num_params=_num_params(config)))


def estimate(preset: Preset) -> dict:
    """Training FLOPs of the whole preset (6 N + attention per token, Kaplan et al.
    2020; evaluation counted as a third of that) and the compiled programs it
    needs: what the time estimate printed at start is made of."""
    g, flops, programs = preset.gradnorm, 0.0, 0
    for placement in g.placements:
        for depth in g.depths:
            per_token = _flops_per_token(preset, g.task, placement, depth, g.width, None)
            flops += per_token * len(g.seeds) * g.batches * g.batch_size * (preset.seq_len + 1)
            programs += 1
    for s in preset.sweeps:
        seq = (s.seq_len or preset.seq_len) + (1 if s.task == "seq2seq" else 0)
        runs = s.runs_per_group * len(s.placements) + s.check_runs
        evals = s.steps // s.eval_every + 1
        for placement in s.placements:
            per_token = _flops_per_token(preset, s.task, placement, s.num_layers, s.width,
                                         s.seq_len)
            tokens = s.batch_size * seq * (s.steps + evals * s.eval_batches / 3)
            flops += per_token * tokens * runs / len(s.placements)
        programs += len(s.placements) * (2 if s.bleu_batches else 1) + (1 if s.check_runs else 0)
    return {"flops": flops, "programs": programs,
            "seconds": flops / preset.device_flops + programs * preset.compile_s}


def estimate_line(preset: Preset) -> str:
    """`estimate` in words: the line the benchmark prints at start."""
    e = estimate(preset)
    return (f"estimate: ~{e['seconds'] / 60:.0f} min = {e['flops'] / 1e12:.1f} TFLOP of model "
            f"arithmetic (6 N + attention per token) at an assumed "
            f"{preset.device_flops / 1e12:g} TFLOP/s sustained ({preset.device}) + "
            f"{e['programs']} XLA compilations at an assumed {preset.compile_s:g} s each")


def run_gradnorm(preset: Preset, out_dir: Path, cache_dir: Path, log: Log) -> bool:
    """The gradient-norm study's missing records; returns whether anything ran."""
    study = preset.gradnorm
    fp = preset.fingerprint(study)
    done = {(r["placement"], r["depth"]) for r in records.read(out_dir, records.GRADNORM, [fp])}
    todo = [(p, d) for p in study.placements for d in study.depths if (p, d) not in done]
    if not todo:
        log("gradient norms at init: all records present, skipped")
        return False
    data = load_task_data(preset, study.task, cache_dir)
    # {field: [seeds, batches, batch, ...]}: each seed's own stream of mini-batches.
    batches = data.train_batches(study.seeds, study.batches, study.batch_size)
    # One (placement, depth) program per local device at a time, from threads (JAX
    # compiles and runs with the GIL released): on a CPU with one virtual device per
    # core (`ln_stability.py`) the compilations, most of this study's time, overlap.
    devices = jax.local_devices()
    with concurrent.futures.ThreadPoolExecutor(len(devices)) as pool:
        jobs = [pool.submit(measure, preset, study, placement, depth, batches,
                            devices[i % len(devices)]) for i, (placement, depth) in enumerate(todo)]
        done_rows = (job.result() for job in jobs)   # in order, as they finish
        for i, ((placement, depth), rows) in enumerate(zip(todo, done_rows)):
            records.append(out_dir, records.GRADNORM, [{"fingerprint": fp, **r} for r in rows])
            top = np.mean([r["w2"][-1] for r in rows])
            log(f"gradient norms at init {i + 1}/{len(todo)}: {placement:8s} L={depth:<3d} "
                f"last-layer |dW2| = {top:.3g} (mean of {len(rows)} seeds)")
    return True


def _check_specs(sweep: Sweep) -> list[RunSpec]:
    """Runs redone one by one: the lowest learning rate of the first placement, with
    seeds and warm-ups taken in turn."""
    lr, seeds, warmups = min(sweep.peak_lrs), sweep.seeds, sweep.warmups
    pairs = [(seeds[i % len(seeds)], warmups[(i + i // len(seeds)) % len(warmups)])
             for i in range(len(seeds) * len(warmups) ** 2)]
    pairs = list(dict.fromkeys(pairs))[:sweep.check_runs]       # distinct, in order
    return [RunSpec(sweep.task, sweep.placements[0], lr, wu, seed, sweep.decay)
            for seed, wu in pairs]


def run_sweep(preset: Preset, sweep: Sweep, out_dir: Path, cache_dir: Path, log: Log) -> bool:
    """`sweep`'s missing runs and checks; returns whether anything ran."""
    fp = preset.fingerprint(sweep)
    done_runs = {r["run_id"] for r in records.read(out_dir, records.RUNS, [fp])}
    done_checks = {r["run_id"] for r in read_checks(out_dir, [fp])}
    todo = [p for p in sweep.placements
            if not {s.run_id for s in group_specs(sweep, p)} <= done_runs]
    checks = [s for s in _check_specs(sweep) if s.run_id not in done_checks]
    if not todo and not checks:
        log(f"sweep {sweep.task}: all records present, skipped")
        return False
    data = load_task_data(preset, sweep.task, cache_dir, sweep.seq_len)
    train = data.train_batches(sweep.seeds, sweep.steps, sweep.batch_size)
    valid = data.valid_batches(sweep.eval_batches, sweep.batch_size)
    unigram = analysis.unigram_loss(sweep.task, train, valid, data.vocab_size)
    if sweep.bleu_batches and not bleu.available():
        log(f"sweep {sweep.task}: {bleu.MISSING}")
    check = _check_recorder(preset, sweep, checks, out_dir, log)
    for placement in todo:
        record = _recorder(preset, sweep, placement, unigram, out_dir, log)
        score = _bleu_scorer(preset, sweep, placement, valid, data.vocab)
        _run_placement(preset, sweep, placement, train, valid, log, record, score, check)
    if checks and checks[0].placement not in todo:
        # Resumed after the group was recorded: redo it (unrecorded) for the check.
        log(f"check: the vmapped runs of {sweep.task}/{checks[0].placement} again")
        _run_placement(preset, sweep, checks[0].placement, train, valid, log, check=check)
    return True


def _bleu_scorer(preset, sweep, placement, valid, vocab):
    """params -> {"bleu": [runs]} for a translation sweep with `bleu_batches` (None
    when it has none, or sacrebleu is missing)."""
    if not sweep.bleu_batches or not bleu.available():
        return None
    model = cached_model(sweep_config(preset, sweep, placement))
    scorer = bleu.make_scorer(model, valid, sweep.bleu_batches, bos_id=vocab.bos_id,
                              eos_id=vocab.eos_id, pad_id=vocab.pad_id)
    return lambda params: {"bleu": scorer(params)}


def _run_placement(preset, sweep, placement, train, valid, log, record=None, score=None,
                   check=None):
    """The placement's grid as one vmapped program (or several of at most
    `sweep.max_vmap` runs); `record(specs, result)` after each; `score` as in
    `run_group`; the runs named by `check.run_ids` shadowed one by one, then
    `check(specs, result)`."""
    specs = group_specs(sweep, placement)
    config = sweep_config(preset, sweep, placement)
    size = sweep.max_vmap or len(specs)
    ids = check.run_ids if check else set()
    for start in range(0, len(specs), size):
        part = specs[start:start + size]
        name = f"{sweep.task}/{placement}" + (f" [{start + 1}-{start + len(part)}]"
                                              if size < len(specs) else "")
        log(f"sweep {name}: {len(part)} runs x {sweep.steps} steps in one vmapped program")
        progress = lambda i, n: log(f"  {name}: step {i * sweep.steps // n}/{sweep.steps}", True)
        shadow = [i for i, s in enumerate(part) if s.run_id in ids]
        result = run_group(config, part, sweep, train, valid, progress=progress, score=score,
                           shadow=shadow)
        log(f"sweep {name}: done in {result.wall_s:.1f}s (compile {result.compile_s:.1f}s)"
            + (f"; BLEU of greedy translations in {result.score_s:.1f}s" if result.final else "")
            + (f"; {len(shadow)} runs checked one by one in "
               f"{sum(s.run_s for s in result.shadows) + result.shadows[0].compile_s:.1f}s"
               if shadow else ""))
        if record:
            record(part, result)
        if shadow:
            check(part, result)


def _recorder(preset, sweep, placement, unigram, out_dir, log):
    fp = preset.fingerprint(sweep)

    def record(specs, result):
        rows = [analysis.run_record(s, result, i, unigram, fp) for i, s in enumerate(specs)]
        records.append(out_dir, records.RUNS, rows)
        records.append(out_dir, records.GROUPS, [{
            "fingerprint": fp, "task": sweep.task, "placement": placement, "runs": len(specs),
            "steps": sweep.steps, "compile_s": result.compile_s, "run_s": result.run_s,
            "cpu_s": result.cpu_s, "score_s": result.score_s}])
        failed = sum(r["diverged"] or not r["escaped_plateau"] for r in rows)
        log(f"  {failed}/{len(rows)} runs diverged or stayed on the unigram plateau")
    return record


def _check_recorder(preset, sweep, checks: list[RunSpec], out_dir, log):
    """`check(specs, result)`: the records of `result.shadows` (runs of `checks`), one
    by one vs vmapped, to CHECKS; `check.run_ids`: the runs to shadow. None if none."""
    if not checks:
        return None
    fp = preset.fingerprint(sweep)

    def check(specs, result):
        for shadow in result.shadows:
            spec = specs[shadow.index]
            d_train = float(np.nanmax(np.abs(shadow.train_loss
                                             - result.metrics["loss"][shadow.index])))
            d_val = float(np.nanmax(np.abs(shadow.val_loss - result.val_loss[shadow.index])))
            records.append(out_dir, records.CHECKS, [{
                "fingerprint": fp, "method": CHECK_METHOD, "run_id": spec.run_id,
                "resync_every": sweep.eval_every,
                "max_abs_diff_train_loss": d_train, "max_abs_diff_val_loss": d_val,
                "passed": max(d_train, d_val) <= CHECK_TOLERANCE,
                "compile_s": shadow.compile_s, "compile_cpu_s": shadow.compile_cpu_s,
                "run_s": shadow.run_s, "cpu_s": shadow.cpu_s, "group_runs": len(specs),
                "group_compile_s": result.compile_s, "group_run_s": result.run_s,
                "group_cpu_s": result.cpu_s}])
            log(f"check {spec.run_id}: one by one (re-synchronised every {sweep.eval_every} "
                f"steps) vs vmapped: max |d loss| = {max(d_train, d_val):.2e}")

    check.run_ids = {s.run_id for s in checks}
    return check
