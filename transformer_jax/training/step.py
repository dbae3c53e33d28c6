"""The train and eval steps: pure functions of (state, batch), jitted by the factories.

    train_step = compute_grads -> [lax.pmean over devices, in a parallel step] -> apply_grads

Nothing here reads Python state, so `jax.vmap(partial(train_step, task=t))` runs
a stack of states (seeds) at once and a data-parallel step can insert its
all-reduce between the two halves.

A non-finite loss or gradient leaves the whole state as it was (params,
optimizer moments, gradient accumulator and step) and reports `finite = 0`:
the last good state stays intact for a checkpoint, and a run that goes on after
a skipped batch sees the same learning rate and dropout key for its next one.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from transformer_jax._compat import donate_argnums
from transformer_jax.training.metrics import global_norm, grouped_norms
from transformer_jax.training.optim import SkipsNonFinite
from transformer_jax.training.state import TrainState
from transformer_jax.training.tasks import Task, get_task

Batch = Mapping[str, Any]


def _resolve(task: Task | str) -> Task:
    return get_task(task) if isinstance(task, str) else task


def _forward(apply_fn, params, batch, task: Task, *, deterministic: bool, rng=None) -> dict:
    task.check_batch(batch)
    rngs = None if rng is None else {"dropout": rng}
    outputs = task.apply(apply_fn, {"params": params}, batch, deterministic=deterministic, rngs=rngs)
    return task.loss(outputs, batch, task)


def compute_loss(apply_fn: Callable, params, batch: Batch, rng, task: Task | str) -> dict:
    """The task's metrics ("loss", ...) on `batch` with dropout on: the forward pass."""
    return _forward(apply_fn, params, batch, _resolve(task), deterministic=False, rng=rng)


def compute_grads(apply_fn: Callable, params, batch: Batch, rng, task: Task | str):
    """-> (loss, task metrics, grads): the loss with dropout on, and d loss / d params
    (float32 like the master parameters, whatever the compute dtype)."""
    task = _resolve(task)

    def loss_fn(p):
        metrics = compute_loss(apply_fn, p, batch, rng, task)
        return metrics["loss"], metrics
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, metrics, grads


def apply_grads(state: TrainState, grads, loss=None, *, detailed: bool = False
                ) -> tuple[TrainState, dict]:
    """One optimizer update, skipped when the loss or the gradient is not finite.
    -> (new state, {grad_norm, finite, [lr]}); `detailed` adds update_norm, param_norm
    and per-layer gradient and update norms ("grad_norm/decoder/layer_3", ...).

    The skip depends only on what is known before the update (with a finite
    gradient and state, AdamW's update is finite: its denominator is at least
    eps), so it need not wait for a norm over every update. `make_optimizer`'s
    AdamW keeps its own state on a skipped step (`SkipsNonFinite`); any other
    optimizer's new state is selected leaf by leaf. `detailed` costs extra
    passes over the gradients, the updates and the parameters."""
    if detailed:
        grad_norm, grad_norms = grouped_norms(grads)
    else:
        grad_norm = global_norm(grads)
    finite = jnp.isfinite(grad_norm)
    if loss is not None:
        finite &= jnp.isfinite(loss)
    # A select per leaf, not lax.cond: on GPU a conditional reads its predicate on
    # the host, a sync in the middle of every step (under vmap a cond is a select anyway).
    keep = functools.partial(optax.tree_utils.tree_where, finite)
    if isinstance(state.tx, SkipsNonFinite):
        # The optimizer keeps its own state on a skipped step (a second select over
        # the moments would make XLA copy them: see SkipsNonFinite).
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params, finite=finite)
        new = state.replace(step=jnp.where(finite, state.step + 1, state.step),
                            params=keep(optax.apply_updates(state.params, updates), state.params),
                            opt_state=opt_state)
    else:
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        new = keep(state.replace(step=state.step + 1, opt_state=opt_state,
                                 params=optax.apply_updates(state.params, updates)), state)
    metrics = {"grad_norm": grad_norm, "finite": finite.astype(jnp.float32)}
    if state.lr_fn is not None:
        metrics["lr"] = jnp.asarray(state.lr_fn(state.step), jnp.float32)
    if detailed:
        update_norm, update_norms = grouped_norms(updates)
        metrics.update({"update_norm": update_norm, "param_norm": global_norm(new.params)})
        metrics.update({f"grad_norm/{k}": v for k, v in grad_norms.items()})
        metrics.update({f"update_norm/{k}": v for k, v in update_norms.items()})
    return new, metrics


def _with_perplexity(metrics: dict) -> dict:
    out = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    if "nll" in out:   # token-level tasks; a classifier's loss has no perplexity
        out["perplexity"] = jnp.exp(out["nll"])
    return out


def train_step(state: TrainState, batch: Batch, task: Task | str, *, detailed: bool = False
               ) -> tuple[TrainState, dict]:
    """One step on one (micro-)batch; the dropout key is fold_in(state.rng, state.step).
    `detailed`: also per-layer gradient / update norms (see `apply_grads`)."""
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    loss, metrics, grads = compute_grads(state.apply_fn, state.params, batch, rng, task)
    state, update_metrics = apply_grads(state, grads, loss, detailed=detailed)
    return state, {**_with_perplexity(metrics), **update_metrics}


def eval_step(state: TrainState, batch: Batch, task: Task | str) -> dict:
    """Loss, accuracy, perplexity and `weight` (target count) without dropout."""
    metrics = _forward(state.apply_fn, state.params, batch, _resolve(task), deterministic=True)
    return _with_perplexity(metrics)


# Cached so that runs of the same task in one process (a sweep, a resumed run)
# share one jitted function, and so one compilation per input shape.
@functools.lru_cache(maxsize=32)
def make_train_step(task: Task | str, *, donate: bool = True, detailed: bool = False) -> Callable:
    """jit(train_step) for `task`; the state argument is donated (its buffers are
    reused for the new state, so the caller must not touch the old one).
    `detailed=True` adds per-layer gradient and update norms to the metrics."""
    return jax.jit(functools.partial(train_step, task=_resolve(task), detailed=detailed),
                   donate_argnums=donate_argnums(0, donate=donate))


@functools.lru_cache(maxsize=32)
def make_eval_step(task: Task | str) -> Callable:
    """jit(eval_step) for `task`: (state, batch) -> metrics, dropout off."""
    return jax.jit(functools.partial(eval_step, task=_resolve(task)))


def mean_metrics(metrics_list: list[Mapping[str, Any]]) -> dict[str, float]:
    """Host-side average of per-batch eval metrics, weighted by each batch's `weight`
    (so every target token counts once); perplexity is exp of the mean nll."""
    if not metrics_list:
        raise ValueError("metrics_list is empty; evaluate at least one batch")
    weights = [float(m["weight"]) for m in metrics_list]
    total = max(sum(weights), 1e-8)
    keys = [k for k in metrics_list[0] if k not in ("weight", "perplexity")]
    out = {k: sum(float(m[k]) * w for m, w in zip(metrics_list, weights)) / total for k in keys}
    out["weight"] = sum(weights)
    out["perplexity"] = float(jnp.exp(out["nll"]))
    return out
