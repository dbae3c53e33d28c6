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

import json
import time
from pathlib import Path

import jax
import numpy as np

from transformer_jax.data import (BatchIterator, BertDataConfig, GPTDataConfig, Seq2SeqDataConfig,
                                  Tokenizer, load_corpus, make_datasets)
from transformer_jax.models.configs import get_config
from transformer_jax.parallel.strategy import Strategy, make_strategy
from transformer_jax.training.checkpoint import Checkpointer
from transformer_jax.training.divergence import DivergenceMonitor
from transformer_jax.training.metrics import measure_matmul_peak, model_flops_per_token, throughput
from transformer_jax.training.optim import learning_rate_fn, make_optimizer
from transformer_jax.training.run_config import RunConfig
from transformer_jax.training.schedules import make_schedule
from transformer_jax.training.signals import GracefulShutdown
from transformer_jax.training.step import mean_metrics
from transformer_jax.training.tasks import get_task


def data_config(run: RunConfig):
    """The data config of the run's task: batches `[batch_size, seq_len]`."""
    if run.data_task == "bert":
        return BertDataConfig(max_len=run.seq_len)
    if run.data_task == "gpt":
        return GPTDataConfig(seq_len=run.seq_len)
    return Seq2SeqDataConfig(max_source_len=run.seq_len - 1)


def model_config(run: RunConfig, vocab_size: int):
    """The preset's config with the run's vocabulary, length, dtype and overrides."""
    base = get_config(run.model)
    fields = dict(vocab_size=vocab_size, max_len=max(base.max_len, run.seq_len + 1), dtype=run.dtype)
    if run.norm_placement:
        fields["norm_placement"] = run.norm_placement
    if run.attention:
        fields["attention"] = {"kind": run.attention}
    fields.update(dict(run.overrides))
    return base.replace(**fields)


def _prepare_out_dir(run: RunConfig) -> Path:
    out = Path(run.out_dir)
    ckpt = out / "checkpoints"
    if ckpt.is_dir() and any(ckpt.iterdir()) and not run.resume:
        raise ValueError(f"out_dir={str(out)!r} already holds checkpoints; pass --resume to continue "
                         "that run, or choose another --out (nothing was overwritten)")
    if run.resume and not ckpt.is_dir():
        raise ValueError(f"--resume was given but {ckpt} does not exist; start without --resume")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _datasets(run: RunConfig, out: Path):
    tok_dir = out / "tokenizer"
    tokenizer = Tokenizer.from_file(tok_dir) if run.resume and tok_dir.is_dir() else None
    corpus = load_corpus(run.data, max_documents=run.max_documents)
    tokenizer, train_ds, valid_ds = make_datasets(run.data_task, corpus, data_config(run),
                                                  vocab_size=run.vocab_size, tokenizer=tokenizer)
    if not tok_dir.is_dir():
        tokenizer.save(tok_dir)
    return tokenizer, train_ds, valid_ds


class _Log:
    """Appends JSON lines; floats only, so any tool can read them."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict) -> None:
        """Append one JSON line; array scalars become floats."""
        clean = {k: (float(v) if isinstance(v, (np.floating, np.ndarray, jax.Array)) else v)
                 for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")


def evaluate(eval_fn, state, valid_ds, run: RunConfig) -> dict:
    """Mean metrics over the first `eval_batches` validation batches `[batch_size, ...]`
    (fixed batches, so evaluations at different steps are comparable)."""
    batches = [valid_ds.batch(i, run.batch_size, seed=run.seed) for i in range(run.eval_batches)]
    return mean_metrics([jax.device_get(eval_fn(state, b)) for b in batches])


def _peak_flops(run: RunConfig) -> float:
    if run.peak_tflops:
        return run.peak_tflops * 1e12
    return measure_matmul_peak("float32" if run.dtype == "float32" else run.dtype, size=1024)


def optimizer(run: RunConfig):
    """(optax transformation, lr-of-step function) for a run."""
    schedule = make_schedule(run.schedule, run.lr, run.warmup, run.steps)
    tx = make_optimizer(schedule, weight_decay=run.weight_decay, clip_norm=run.clip_norm,
                        accumulation_steps=run.accumulation)
    return tx, learning_rate_fn(schedule, run.accumulation)


def build(run: RunConfig, out: Path, strategy: Strategy | None = None):
    """(tokenizer, datasets, model config, task, train state) for a run; the state is
    created as the parallel strategy places it (sharded at creation for --parallel shard)."""
    tokenizer, train_ds, valid_ds = _datasets(run, out)
    config = model_config(run, tokenizer.vocab_size)
    task = get_task({"bert": "mlm", "gpt": "lm", "seq2seq": "seq2seq"}[run.data_task])
    tx, lr_fn = optimizer(run)
    state = (strategy or Strategy()).create_state(config, tx, jax.random.PRNGKey(run.seed),
                                                  task=task.name, lr_fn=lr_fn)
    return tokenizer, train_ds, valid_ds, config, task, state


def _restore(ckpt: Checkpointer, state, config, iterator, monitor, run: RunConfig):
    if ckpt.latest_step() is None:
        return state
    state, record = ckpt.restore(state, config=config)
    meta = record["metadata"]
    saved = RunConfig.from_dict(meta["run"])
    changed = [k for k in ("model", "task", "seq_len", "batch_size", "seed", "accumulation",
                           "lr", "warmup", "schedule", "vocab_size", "data")
               if getattr(saved, k) != getattr(run, k)]
    if changed:
        raise ValueError(f"cannot resume {ckpt.directory}: run settings differ from the saved run: "
                         + "; ".join(f"{k}: saved {getattr(saved, k)!r}, now {getattr(run, k)!r}"
                                     for k in changed))
    iterator.restore(meta["iterator"])
    monitor.load_state_dict(meta["monitor"])
    return state


def _save(ckpt, state, config, run, iterator, monitor, *, force=False) -> bool:
    meta = {"run": run.to_dict(), "iterator": iterator.state(), "monitor": monitor.state_dict(),
            "tokenizer": "tokenizer"}
    return ckpt.save(int(state.step), state, config=config, metadata=meta, force=force)


def train(run: RunConfig, *, progress: bool = True) -> dict:
    """Runs (or resumes) training; returns the summary record also written to
    `summary.json`. Divergence and interruption end the run cleanly, never raise."""
    # Checked before any work: mesh vs devices, heads vs tensor, batch vs data x fsdp.
    strategy = make_strategy(run.parallel, run.mesh, batch_size=run.batch_size,
                             config=model_config(run, run.vocab_size))
    out = _prepare_out_dir(run)
    tokenizer, train_ds, valid_ds, config, task, state = build(run, out, strategy)
    micro_steps = run.steps * run.accumulation
    iterator = BatchIterator(train_ds, run.batch_size, seed=run.seed)
    monitor = DivergenceMonitor()
    log = _Log(out / "metrics.jsonl")
    step_fn, eval_fn = strategy.train_step(task, detailed=run.layer_norms), strategy.eval_step(task)
    host = strategy.host_state   # the state evaluation and checkpoints see
    flops_per_token = model_flops_per_token(config, run.seq_len)
    peak = _peak_flops(run)
    summary = {"status": "completed", "diverged_at": None, "run": run.to_dict(),
               "num_params": int(sum(x.size for x in jax.tree.leaves(state.params)))}
    with Checkpointer(out / "checkpoints", save_interval_steps=run.save_every,
                      max_to_keep=run.keep) as ckpt, GracefulShutdown() as stop:
        state = strategy.place_state(_restore(ckpt, state, config, iterator, monitor, run))
        start_step = int(host(state).step)
        first_eval = evaluate(eval_fn, host(state), valid_ds, run)
        log.write({"step": start_step, "kind": "eval", **first_eval})
        summary["initial_val_loss"] = first_eval["loss"]
        bar = _progress(progress, start_step, micro_steps)
        stop_step = min(micro_steps, (run.stop_at or run.steps) * run.accumulation)
        tic, tokens, pending, step = time.perf_counter(), 0, [], start_step
        while step < stop_step:
            batch = next(iterator)
            tokens += task.num_tokens(batch)
            state, metrics = step_fn(state, batch)
            pending.append(metrics)
            step += 1
            if len(pending) >= run.log_every or stop.requested or step == stop_step:
                speed = throughput(tokens, time.perf_counter() - tic, flops_per_token, peak)
                diverged = _flush(pending, monitor, log, speed, step - len(pending) + 1, bar)
                tic, tokens, pending = time.perf_counter(), 0, []
                if diverged is not None:
                    # Non-finite updates were skipped, so the state (and the last
                    # checkpoint) is the last good one; nothing more is saved.
                    summary.update(status="diverged", diverged_at=diverged)
                    break
            if stop.requested:
                summary["status"] = "interrupted"
                break
            if step % run.eval_every == 0:
                log.write({"step": step, "kind": "eval",
                           **evaluate(eval_fn, host(state), valid_ds, run)})
            _save(ckpt, host(state), config, run, iterator, monitor)
        if summary["status"] == "completed" and step < micro_steps:
            summary["status"] = "stopped"
        if summary["status"] != "diverged":
            _save(ckpt, host(state), config, run, iterator, monitor, force=True)
        bar.close()
    return _finish(out, summary, host(state), eval_fn, valid_ds, run, monitor)


def _progress(enabled: bool, start: int, total: int):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, disable=not enabled, desc="train", unit="step",
                dynamic_ncols=True)


def _flush(pending, monitor, log, speed, first_step, bar) -> int | None:
    """Logs the buffered step metrics; returns the divergence step, if any."""
    for i, metrics in enumerate(jax.device_get(pending)):
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


def _finish(out: Path, summary: dict, state, eval_fn, valid_ds, run, monitor) -> dict:
    final = evaluate(eval_fn, state, valid_ds, run)
    _Log(out / "metrics.jsonl").write({"step": int(state.step), "kind": "final_eval", **final})
    summary.update(step=int(state.step), final_val_loss=final["loss"],
                   final_val_perplexity=final["perplexity"], loss_spikes=monitor.num_spikes)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_sec"] for r in records if r.get("kind") == "train"]
    if speeds:
        summary["tokens_per_sec"] = float(np.median(speeds))
        summary["mfu"] = float(np.median([r.get("mfu", 0.0) for r in records if r.get("kind") == "train"]))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_losses(records, out / "loss.png", title=f"{run.model} / {run.task}")
    return summary


def plot_losses(records: list[dict], path: Path, title: str = "") -> None:
    """`loss.png`: train and validation loss against step, from metrics.jsonl records."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, style in (("train", "-"), ("eval", "o-")):
        pts = [(r["step"], r["loss"]) for r in records if r.get("kind") == kind]
        if pts:
            ax.plot(*zip(*pts), style, label=f"{'validation' if kind == 'eval' else kind} loss",
                    markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
