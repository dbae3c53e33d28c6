"""The training loop behind `transformer-jax train`: data -> model -> steps ->
evaluation, checkpoints, metrics JSONL, a loss plot and a summary record.

A run directory holds
  tokenizer/        the tokenizer the run was trained with (reused on resume)
  checkpoints/      Orbax steps, each with the model config, run config and data position
  metrics.jsonl     one line per logged step and per evaluation
  summary.json      status (completed | diverged | interrupted), steps, losses, speed
  loss.png          train and validation loss curves
"""
from __future__ import annotations

import time
import types
from pathlib import Path

import jax
import numpy as np

from transformer_jax.data import BatchIterator, Tokenizer, load_corpus, make_datasets
from transformer_jax.models.configs import get_config
from transformer_jax.parallel.strategy import Strategy, make_strategy
from transformer_jax.training.checkpoint import Checkpointer
from transformer_jax.training.divergence import DivergenceMonitor
from transformer_jax.training.metrics import measure_matmul_peak, model_flops_per_token, throughput
from transformer_jax.training.optim import learning_rate_fn, make_optimizer
from transformer_jax.training.schedules import make_schedule
from transformer_jax.training.signals import GracefulShutdown
from transformer_jax.training.step import mean_metrics
from transformer_jax.training.tasks import get_task
from transformer_jax.run import finetune
from transformer_jax.run.config import RunConfig
from transformer_jax.run.files import MetricsLog, check_output_dir, write_summary
from transformer_jax.run.plots import plot_losses


def data_config(run: RunConfig):
    """The data config of the run's task (its `Task.data_config`): batches `[batch_size, seq_len]`."""
    return get_task(run.task).data_config(run.seq_len)


def model_config(run: RunConfig, vocab_size: int, base=None):
    """The preset's config (or `base`, a pre-trained model's for --init) with the run's
    vocabulary, dtype and overrides (its max_len stays: RunConfig refuses a --seq-len
    beyond it rather than growing the table)."""
    base = get_config(run.model) if base is None else base
    fields = dict(vocab_size=vocab_size, dtype=run.dtype)
    if run.norm_placement:
        fields["norm_placement"] = run.norm_placement
    if run.attention:
        fields["attention"] = {"kind": run.attention}
    fields.update(dict(run.overrides))
    return base.replace(**fields)


def check_out_dir(run: RunConfig) -> Path:
    """The run directory, checked (nothing is written): it can be created, and a fresh
    run does not mix its files with an earlier run's, nor a resume lack a checkpoint."""
    out = check_output_dir(run.out_dir)
    ckpt = out / "checkpoints"
    has_ckpt = ckpt.is_dir() and any(ckpt.iterdir())
    if run.resume and not has_ckpt:
        raise ValueError(f"--resume: {str(out)!r} holds no checkpoint to resume from (a run "
                         f"saves every --save-every updates and when it stops); start afresh "
                         "with another --out")
    if not run.resume:
        earlier = [n for n in ("checkpoints", "tokenizer", "metrics.jsonl", "summary.json")
                   if (out / n).exists() and (n != "checkpoints" or has_ckpt)]
        if earlier:
            hint = ("pass --resume to continue that run, or" if has_ckpt else
                    "it saved no checkpoint to resume from; delete them or")
            raise ValueError(f"--out {str(out)!r} already holds {', '.join(earlier)} of an earlier "
                             f"run; {hint} choose another --out (nothing was overwritten)")
    return out


def saved_run(out_dir) -> tuple[RunConfig, int]:
    """(run config, step) of the newest checkpoint in `out_dir`, for --resume."""
    run = RunConfig(out_dir=str(out_dir), resume=True)
    check_out_dir(run)
    from transformer_jax.training.checkpoint import load_metadata
    record = load_metadata(Path(out_dir) / "checkpoints")
    return RunConfig.from_dict(record["metadata"]["run"]), int(record["step"])


def _datasets(run: RunConfig, out: Path):
    """(tokenizer, train, valid): the run's own tokenizer on resume; nothing is written."""
    tok_dir = out / "tokenizer"
    tokenizer = Tokenizer.from_file(tok_dir) if run.resume and tok_dir.is_dir() else None
    try:
        corpus = load_corpus(run.data, max_documents=run.max_documents)
        return make_datasets(get_task(run.task).dataset, corpus, data_config(run), vocab_size=run.vocab_size,
                             tokenizer=tokenizer)
    except UnicodeDecodeError as e:   # raised while the documents are read, lazily
        raise ValueError(f"--data {run.data!r}: a file is not UTF-8 text ({e.reason} at byte "
                         f"{e.start}); give text files") from e
    except ValueError as e:
        raise ValueError(f"--data {run.data!r}: {e}" if run.data is not None else str(e)) from e


def _data(run: RunConfig, out: Path) -> types.SimpleNamespace:
    """What the run trains on, read and checked before anything is written: tokenizer,
    datasets, the task (with its label set for fine-tuning), and for --init the
    pre-trained config and parameters."""
    data = types.SimpleNamespace(labels=None, base=None, pretrained=None, note=None)
    if not finetune.is_finetune(run.task):
        data.tokenizer, data.train, data.valid = _datasets(run, out)
        data.task = get_task(run.task)
        return data
    tokenizer = None
    if run.init is not None:
        data.base, data.pretrained, tokenizer, what = finetune.load_pretrained(run.init, run.task)
        data.note = f"--init: the encoder of {what}"
        if run.seq_len > data.base.max_len:
            raise ValueError(f"--seq-len {run.seq_len} is above --init's max_len={data.base.max_len}")
    if run.resume and (out / "tokenizer").is_dir():
        tokenizer = Tokenizer.from_file(out / "tokenizer")
    data.tokenizer, data.train, data.valid, data.labels = finetune.datasets(run, out, tokenizer)
    data.task = get_task(run.task, labels=data.labels)
    return data


def evaluate(eval_fn, state, valid_ds, run: RunConfig, task=None) -> dict:
    """Mean metrics over the first `eval_batches` validation batches `[batch_size, ...]`
    (fixed batches, so evaluations at different steps are comparable); a fine-tuning
    task's whole eval file, its metrics finalized (F1 from the summed counts)."""
    count = run.eval_batches
    if task is not None and task.with_labels is not None:
        count = valid_ds.num_batches(run.batch_size)
    batches = [valid_ds.batch(i, run.batch_size, seed=run.seed) for i in range(count)]
    metrics = mean_metrics([jax.device_get(eval_fn(state, b)) for b in batches])
    return task.finalize(metrics) if task is not None and task.finalize else metrics


def _peak_flops(run: RunConfig) -> float | None:
    """None with --peak-tflops (a fixed peak); else the best of a few matmul timings."""
    if run.peak_tflops:
        return None
    return measure_matmul_peak("float32" if run.dtype == "float32" else run.dtype, size=1024,
                               repeats=10)


def optimizer(run: RunConfig):
    """(optax transformation, lr-of-step function) for a run."""
    schedule = make_schedule(run.schedule, run.lr, run.warmup, run.steps, run.drop_step)
    tx = make_optimizer(schedule, weight_decay=run.weight_decay, clip_norm=run.clip_norm,
                        accumulation_steps=run.accumulation)
    return tx, learning_rate_fn(schedule, run.accumulation)


def fresh_state(run: RunConfig, config, strategy: Strategy | None = None, task=None,
                pretrained=None):
    """The run's initial train state (a pure function of its seed), placed as the
    parallel strategy places it (sharded at creation for --parallel shard); with
    `pretrained` parameters (--init), the encoder is theirs and the head fresh."""
    tx, lr_fn = optimizer(run)
    task = get_task(run.task) if task is None else task
    state = (strategy or Strategy()).create_state(config, tx, jax.random.PRNGKey(run.seed),
                                                  task=task, lr_fn=lr_fn)
    if pretrained is None:
        return state
    from transformer_jax.training.finetune import init_from_pretrained
    params, _ = init_from_pretrained(jax.device_get(state.params), pretrained)
    return state.replace(params=params)


def _restore(ckpt: Checkpointer, state, config, iterator, monitor, run: RunConfig, labels,
             out: Path):
    if ckpt.latest_step() is None:
        return state
    if labels is not None:   # the run's labels.json vs the checkpoint's, before its shapes
        finetune.check_labels(labels, ckpt.read_metadata()["metadata"], out / finetune.LABELS_FILE)
    state, record = ckpt.restore(state, config=config)
    meta = record["metadata"]
    run.resume_changes(RunConfig.from_dict(meta["run"]))   # ValueError naming the flags
    iterator.restore(meta["iterator"])
    monitor.load_state_dict(meta["monitor"])
    return state


def _save(ckpt, state, config, run, iterator, monitor_state: dict, labels, *,
          force=False) -> bool:
    meta = {"run": run.to_dict(), "iterator": iterator.state(), "monitor": monitor_state,
            "tokenizer": "tokenizer"}
    if labels is not None:   # a fine-tuning head's label set, in its order (load_labels)
        meta["labels"] = labels.to_dict()
    return ckpt.save(int(state.step), state, config=config, metadata=meta, force=force)


def _last_good(state, good_step: int, loop) -> object:
    """The state after `good_step` micro-steps. Steps after a skipped (non-finite) one
    may have been applied before the host saw it, so the state is rebuilt: the newest
    checkpoint (all are verified good) or the initial state, then the same batches
    again (batch i and the dropout key of step i are pure functions of i: exact)."""
    host, iterator = loop.strategy.host_state, loop.iterator
    if int(host(state).step) != good_step:
        steps = [s for s in loop.ckpt.all_steps() if s <= good_step]
        if steps:
            restored, record = loop.ckpt.restore(host(state), step=steps[-1], config=loop.config)
            state = loop.strategy.place_state(restored)
            iterator.restore(record["metadata"]["iterator"])
        else:
            state = loop.strategy.place_state(fresh_state(loop.run, loop.config, loop.strategy,
                                                          loop.task, loop.pretrained))
            iterator.restore({**iterator.state(), "step": 0})
        while iterator.step < good_step:
            state, _ = loop.step_fn(state, next(iterator))
    iterator.restore({**iterator.state(), "step": good_step})
    return state


def _monitor_at(log: MetricsLog, step: int) -> dict:
    """The divergence monitor's state as of `step`, replayed from the logged train
    records: the checkpoint of a diverged run is older than the monitor's last update."""
    monitor = DivergenceMonitor()
    for record in log.read():
        if record.get("kind") == "train" and record["step"] <= step:
            monitor.update(record["step"], record)
    return {**monitor.state_dict(), "diverged_at": None}


def train(run: RunConfig, *, progress: bool = True) -> dict:
    """Runs (or resumes) training; returns the summary record also written to
    `summary.json`. Divergence and interruption end the run cleanly, never raise.
    Every setting is checked, and the data read, before anything is written."""
    config = model_config(run, run.vocab_size)
    optimizer(run)   # the schedule's checks
    # Checked before any work: mesh vs devices, heads vs tensor, batch vs data x fsdp.
    strategy = make_strategy(run.parallel, run.mesh, batch_size=run.batch_size, config=config)
    out = check_out_dir(run)
    data = _data(run, out)
    tokenizer, train_ds, valid_ds, task = data.tokenizer, data.train, data.valid, data.task
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "tokenizer").is_dir():
        tokenizer.save(out / "tokenizer")
    if data.labels is not None and not (out / finetune.LABELS_FILE).is_file():
        data.labels.save(out / finetune.LABELS_FILE)
    if data.note:   # what --init loaded: said even without progress output (provenance)
        print(data.note, flush=True)
    if progress and run.parallel == "auto" and jax.device_count() > 1:
        print(f"--parallel {run.parallel}: {strategy.mode} over {jax.device_count()} "
              "device(s)", flush=True)
    config = model_config(run, tokenizer.vocab_size, base=data.base)
    tx, lr_fn = optimizer(run)
    strategy = strategy.bind(config, tx, task=task, lr_fn=lr_fn)   # shard: state shardings
    state = fresh_state(run, config, strategy, task, data.pretrained)
    # What the loop and its helpers share (checkpointer added once open).
    loop = types.SimpleNamespace(run=run, config=config, strategy=strategy, task=task,
                                 labels=data.labels,
                                 pretrained=data.pretrained, iterator=BatchIterator(
        train_ds, run.batch_size, seed=run.seed), step_fn=strategy.train_step(task, detailed=run.layer_norms))
    monitor, log = DivergenceMonitor(), MetricsLog(out / "metrics.jsonl")
    eval_fn, host = strategy.eval_step(task), strategy.host_state
    flops_per_token = model_flops_per_token(config, run.seq_len)
    peaks = [p for p in [_peak_flops(run)] if p]
    peak = run.peak_tflops * 1e12 if run.peak_tflops else peaks[0]
    summary = {"status": "completed", "diverged_at": None, "run": run.to_dict(),
               "num_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
               "parallel": {"mode": strategy.mode, "devices": jax.device_count()}}
    with Checkpointer(out / "checkpoints", save_interval_steps=run.save_every,
                      max_to_keep=run.keep) as ckpt, GracefulShutdown() as stop:
        loop.ckpt = ckpt
        state = strategy.place_state(_restore(ckpt, state, config, loop.iterator, monitor, run,
                                              loop.labels, out))
        start_step = int(host(state).step)
        if run.resume:
            summary["resumed_from"] = start_step
            log.truncate(start_step)   # a crashed session logged past its last checkpoint
        first = next((r for r in log.read() if r.get("kind") == "eval" and r["step"] == 0), None)
        if first is None:
            first = {"step": start_step, "kind": "eval",
                     **evaluate(eval_fn, host(state), valid_ds, run, task)}
            log.write(first)
        summary["initial_val_loss"] = first["loss"]
        state, step = _run_steps(state, start_step, loop, task, monitor, log, summary, stop,
                                 (eval_fn, valid_ds, flops_per_token, peak, progress))
        if summary["status"] == "completed" and step < run.micro_steps:
            summary["status"] = "stopped"
        monitor_state = getattr(loop, "monitor_state", None) or \
            {**monitor.state_dict(), "diverged_at": None}   # as of the saved step
        _save(ckpt, host(state), config, run, loop.iterator, monitor_state, loop.labels,
              force=True)
    if not run.peak_tflops:
        peaks.append(_peak_flops(run))
    return _finish(out, summary, host(state), eval_fn, valid_ds, run, monitor, peaks, task)


def _run_steps(state, step, loop, task, monitor, log, summary, stop, extra):
    """The update loop from micro-step `step`; -> (state, step). Flushes (checks) the
    pending metrics before every evaluation and checkpoint, so that a checkpoint only
    ever holds verified steps; on divergence, the state becomes the last good one."""
    eval_fn, valid_ds, flops_per_token, peak, progress = extra
    run, host = loop.run, loop.strategy.host_state
    total = run.micro_steps
    stop_step = min(total, (run.stop_at or run.steps) * run.accumulation)
    bar = _progress(progress, step, total)
    tic, tokens, pending = time.perf_counter(), 0, []
    while step < stop_step:
        batch = next(loop.iterator)
        tokens += task.num_tokens(batch)
        state, metrics = loop.step_fn(state, batch)
        pending.append(metrics)
        step += 1
        boundary = step % run.eval_every == 0 or step % run.save_every == 0
        if len(pending) >= run.log_every or stop.requested or step == stop_step or boundary:
            jax.block_until_ready(pending)   # dispatch is asynchronous: time the work itself
            speed = throughput(tokens, time.perf_counter() - tic, flops_per_token, peak)
            diverged = _flush(pending, monitor, log, speed, step - len(pending) + 1, bar,
                              loop.task.finalize)
            tic, tokens, pending = time.perf_counter(), 0, []
            if diverged is not None:
                summary.update(status="diverged", diverged_at=diverged)
                # Step k's loss and gradient are those of the parameters after step
                # k - 1, whatever the settings: resuming there diverges again even at
                # a lower --lr. The state kept is the one before that update.
                good = max(diverged - 2, 0)
                loop.ckpt.delete_after(good)
                state, step = _last_good(state, good, loop), good
                loop.monitor_state = _monitor_at(log, good)
                break
        if stop.requested:
            summary["status"] = "interrupted"
            break
        if step % run.eval_every == 0:
            log.write({"step": step, "kind": "eval",
                       **evaluate(eval_fn, host(state), valid_ds, run, loop.task)})
        if step % run.save_every == 0:   # just flushed: every step so far is verified
            _save(loop.ckpt, host(state), loop.config, run, loop.iterator,
                  {**monitor.state_dict(), "diverged_at": None}, loop.labels)
    bar.close()
    return state, step


def _progress(enabled: bool, start: int, total: int):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, disable=not enabled, desc="train", unit="step",
                dynamic_ncols=True)


def _flush(pending, monitor, log, speed, first_step, bar, finalize=None) -> int | None:
    """Logs the buffered step metrics (`finalize`d: e.g. a batch's F1 from its counts);
    returns the divergence step, if any."""
    for i, metrics in enumerate(jax.device_get(pending)):
        metrics = finalize(metrics) if finalize else metrics
        step = first_step + i
        status = monitor.update(step, metrics)
        record = {"step": step, "kind": "train", "loss_spikes": status.num_spikes,
                  **metrics, **speed}
        log.write(record)
        bar.update(1)
        if status.diverged:
            bar.write(f"diverged: {status.reason}")
            return step
    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record.get('lr', 0):.2e}",
                    tok_s=f"{speed['tokens_per_sec']:.0f}")
    return None


def _finish(out: Path, summary: dict, state, eval_fn, valid_ds, run, monitor,
            peaks: list[float], task) -> dict:
    final = evaluate(eval_fn, state, valid_ds, run, task)
    log = MetricsLog(out / "metrics.jsonl")
    log.write({"step": int(state.step), "kind": "final_eval", **final})
    summary.update(step=int(state.step), final_val_loss=final["loss"],
                   final_val_perplexity=final.get("perplexity"), loss_spikes=monitor.num_spikes,
                   final_val_metrics={k: v for k, v in final.items() if k != "weight"})
    records = log.read()
    summary.update(_speed_summary(records, run, peaks))
    write_summary(out / "summary.json", summary)
    plot_losses(records, out / "loss.png", title=f"{run.model} / {run.task}")
    return summary


def _speed_summary(records: list[dict], run: RunConfig, peaks: list[float]) -> dict:
    """Median tokens/s and MFU over the logged steps. The measured peak is the best of
    the matmul timings at start-up and at the end (a shared machine slows some of
    them); mfu_range is the MFU under the slowest and the fastest of those peaks."""
    train = [r for r in records if r.get("kind") == "train" and r.get("tokens_per_sec")]
    if not train:
        return {}
    flops = float(np.median([r["model_flops_per_sec"] for r in train]))
    peak = run.peak_tflops * 1e12 if run.peak_tflops else max(peaks)
    out = {"tokens_per_sec": float(np.median([r["tokens_per_sec"] for r in train])),
           "mfu": flops / peak, "peak_flops": peak}
    if not run.peak_tflops:
        out.update(peak_flops_measured=peaks, mfu_range=[flops / max(peaks), flops / min(peaks)])
    return out
