"""Load a trained run directory (written by `run.loop.train`) for inference."""
from __future__ import annotations

from pathlib import Path

from transformer_jax.data import Tokenizer
from transformer_jax.training.checkpoint import restore_checkpoint, load_metadata
from transformer_jax.training.config_io import config_from_dict
from transformer_jax.run.config import RunConfig
from transformer_jax.run.finetune import task_of
from transformer_jax.run.loop import optimizer
from transformer_jax.training.state import abstract_train_state


def is_run_dir(path) -> bool:
    """Whether `path` is a run directory of `run.loop.train` (it has checkpoints/)."""
    return (Path(path) / "checkpoints").is_dir()


def load_run(path, step: int | None = None):
    """-> (model config, params, tokenizer, run config) of the latest (or given) step."""
    return _load_run(path, step)[:4]


def _load_run(path, step: int | None):
    """load_run's tuple and the step of the checkpoint restored (as the logs count it)."""
    path = Path(path)
    if not is_run_dir(path):
        raise ValueError(f"{path} is not a training run directory (no checkpoints/ inside); "
                         "pass the --out directory of `transformer-jax train` or a Hugging Face "
                         "directory with config.json")
    record = load_metadata(path / "checkpoints", step)
    if record.get("config") is None or "run" not in record.get("metadata", {}):
        # e.g. a Checkpointer of one's own code saving into <dir>/checkpoints
        raise ValueError(f"{path / 'checkpoints'} holds a checkpoint without the model and run "
                         "configs `transformer-jax train` records, so it cannot be loaded as a "
                         "run; restore it with transformer_jax.training.restore_checkpoint")
    config = config_from_dict(record["config"])
    run = RunConfig.from_dict(record["metadata"]["run"])
    tx, _ = optimizer(run)  # shapes the restore target; optimizer values are unused here
    target = abstract_train_state(config, tx, task=task_of(run.task, path, record["metadata"]))
    state, _ = restore_checkpoint(path / "checkpoints", target, step=record["step"], config=config)
    tokenizer = Tokenizer.from_file(path / record["metadata"].get("tokenizer", "tokenizer"))
    return config, state.params, tokenizer, run, record["step"]


def load_model_dir(path, flag: str = "--model"):
    """-> (config, params, tokenizer, pooling, what it is) from one of our run
    directories or a Hugging Face directory (config.json and a tokenizer); `flag`
    names the option in errors."""
    if is_run_dir(path):
        # The step restored, not --steps: a run stopped, cut or diverged early is saved
        # before it, and this text is the provenance a fine-tuning run records.
        config, params, tokenizer, run, saved = _load_run(path, None)
        return config, params, tokenizer, "cls", (f"run directory {str(path)!r} ({run.model}, "
                                                  f"{run.task}, checkpoint step {saved} of "
                                                  f"{run.micro_steps})")
    if (Path(path) / "config.json").is_file():
        from transformer_jax.hf import load_pretrained
        pre = load_pretrained(path)
        if pre.tokenizer is None:
            raise ValueError(f"{flag} {str(path)!r} has no tokenizer.json or vocab.txt; the CLI "
                             "needs one")
        pooling = pre.pooling.mode if pre.pooling is not None else "cls"
        return (pre.config, pre.params, Tokenizer(pre.tokenizer), pooling,
                f"Hugging Face directory {str(path)!r}")
    raise ValueError(f"{flag} {str(path)!r} is neither a run directory (with checkpoints/) nor a "
                     "Hugging Face directory (with config.json)")
