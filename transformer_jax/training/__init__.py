"""Training core: tasks and losses, schedules, AdamW, the train/eval steps,
diagnostics (norms, FLOPs, MFU), divergence detection and Orbax checkpoints.

Typical wiring (the run loop itself is `transformer_jax.run`, one layer up):
    task = get_task(task_for_config(config))
    schedule = make_schedule("cosine", 1e-3, warmup_steps=100, total_steps=10_000)
    tx = make_optimizer(schedule, weight_decay=0.01, accumulation_steps=k)
    state = create_train_state(config, tx, jax.random.PRNGKey(seed), lr_fn=learning_rate_fn(schedule, k))
    step_fn = make_train_step(task)            # state is donated
    state, metrics = step_fn(state, batch)
"""
from transformer_jax.training.checkpoint import (Checkpointer, load_metadata, restore_checkpoint,
                                                 state_spec)
from transformer_jax.training.config_io import config_diff, config_from_dict, config_to_dict
from transformer_jax.training.divergence import DivergenceMonitor, DivergenceStatus, is_diverged
from transformer_jax.cross_entropy import token_stats
from transformer_jax.training.losses import (lm_loss, mlm_loss, nsp_loss, seq2seq_loss,
                                             weighted_mean)
from transformer_jax.training.metrics import (count_params, global_norm, group_name, grouped_norms,
                                              measure_matmul_peak, model_flops_per_token,
                                              throughput)
from transformer_jax.training.optim import (SkipsNonFinite, decay_mask, learning_rate_fn,
                                             make_optimizer)
from transformer_jax.training.schedules import SCHEDULES, make_schedule
from transformer_jax.training.signals import GracefulShutdown
from transformer_jax.training.state import (TrainState, abstract_train_state, create_train_state,
                                            init_params)
from transformer_jax.training.step import (apply_grads, compute_grads, eval_step, make_eval_step,
                                           make_train_step, mean_metrics, train_step)
from transformer_jax.training.tasks import (TASKS, Task, get_task, register_task, task_for_config,
                                            unregister_task)

__all__ = [
    "SCHEDULES", "TASKS", "Checkpointer", "DivergenceMonitor", "DivergenceStatus",
    "GracefulShutdown", "SkipsNonFinite", "Task", "TrainState", "abstract_train_state",
    "apply_grads", "compute_grads", "config_diff", "config_from_dict", "config_to_dict",
    "count_params", "create_train_state", "decay_mask", "eval_step", "get_task",
    "global_norm", "group_name", "grouped_norms", "init_params", "is_diverged",
    "learning_rate_fn", "lm_loss", "load_metadata", "make_eval_step", "make_optimizer",
    "make_schedule", "make_train_step", "mean_metrics", "measure_matmul_peak", "mlm_loss",
    "model_flops_per_token", "nsp_loss", "restore_checkpoint", "seq2seq_loss", "state_spec",
    "register_task", "task_for_config", "unregister_task", "throughput", "token_stats", "train_step", "weighted_mean",
]
