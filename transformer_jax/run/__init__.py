"""The run layer, above training and parallel: a whole training run from a
`RunConfig` (data, model, strategy, steps, evaluation, checkpoints, metrics,
plots), loading finished runs, and the `transformer-jax` command line.

    from transformer_jax.run import RunConfig, train
    summary = train(RunConfig(model="gpt-tiny", task="lm", steps=50, out_dir="runs/x"))
"""
from transformer_jax.run.config import RunConfig
from transformer_jax.run.loading import is_run_dir, load_run
from transformer_jax.run.loop import train

__all__ = ["RunConfig", "is_run_dir", "load_run", "train"]
