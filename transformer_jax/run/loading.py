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
    path = Path(path)
    if not is_run_dir(path):
        raise ValueError(f"{path} is not a training run directory (no checkpoints/ inside); "
                         "pass the --out directory of `transformer-jax train` or a Hugging Face "
                         "directory with config.json")
    record = load_metadata(path / "checkpoints", step)
    config = config_from_dict(record["config"])
    run = RunConfig.from_dict(record["metadata"]["run"])
    tx, _ = optimizer(run)  # shapes the restore target; optimizer values are unused here
    target = abstract_train_state(config, tx, task=task_of(run.task, path))
    state, _ = restore_checkpoint(path / "checkpoints", target, step=record["step"], config=config)
    tokenizer = Tokenizer.from_file(path / record["metadata"].get("tokenizer", "tokenizer"))
    return config, state.params, tokenizer, run
