"""Gradient norms at initialization, per layer (Xiong et al. 2020, arXiv 2002.04745).

Their Theorem 1 (sec. 3.3): for the last layer's FFN weights, post-LN's gradient
norm is O(d sqrt(ln d)) whatever the depth L, pre-LN's O(d sqrt(ln d / L)); their
Fig. 3 shows post-LN's W^(2) gradient growing towards the top of the stack and
pre-LN's staying flat. Here, for every (placement, depth, seed): a fresh model
from that seed, one real batch of that data seed, one gradient, and per layer the
Frobenius norms of W^(2) (`mlp/down`), W^(1) (`mlp/up`) and of all attention
kernels together.

The gradient is taken eagerly, op by op, unless `study.eager` is False: compiling a
deep unrolled model costs tens of seconds per (placement, depth) on a CPU, more
than running it once, while eager primitives are compiled once (~20 s for all)
and reused across layers, depths and placements. For 1-2 layer models compiling
is the cheaper of the two.
"""
from __future__ import annotations

import re

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from experiments.ln.presets import GradNormStudy, Preset, model_config
from experiments.ln.sweep import cached_model, init_params
from transformer_jax.training import compute_grads, get_task

_PARAM = re.compile(r".*/layer_(\d+)/(?:(mlp)/(up|down)|(?:self_)?attention/\w+)/kernel")
GROUPS = ("w2", "w1", "attention")     # mlp/down, mlp/up, attention kernels


def layer_grad_norms(grads, num_layers: int) -> dict[str, list[float]]:
    """{group: [norm of layer 0, ..., layer L-1]} of a gradient tree (BERT or GPT)."""
    squares = {g: np.zeros(num_layers) for g in GROUPS}
    for path, leaf in traverse_util.flatten_dict(grads, sep="/").items():
        match = _PARAM.fullmatch(path)
        if match is None:
            continue
        layer, mlp, which = int(match.group(1)), match.group(2), match.group(3)
        group = "attention" if mlp is None else ("w2" if which == "down" else "w1")
        squares[group][layer] += float(jnp.sum(jnp.square(leaf)))
    return {g: np.sqrt(s).tolist() for g, s in squares.items()}


def measure(preset: Preset, study: GradNormStudy, placement: str, depth: int,
            batches: dict) -> list[dict]:
    """One record per seed of `study.seeds`: per-layer norms and the loss of a fresh
    model from that seed on that seed's batch (`batches`: {field: [seeds, batch, ...]}).
    The seeds are vmapped: eagerly, one dispatch per op for all of them; or jitted,
    with parameters from the sweep's eager `init_params` (compiled init is slow)."""
    config = model_config(preset, study.task, placement, depth, study.width)
    apply, task = cached_model(config).apply, get_task(study.task)
    keys = [jax.random.PRNGKey(s) for s in study.seeds]

    def grads_of(params, batch):
        loss, _, grads = compute_grads(apply, params, batch, None, task)
        return loss, grads

    if study.eager:
        fn = jax.vmap(lambda key, batch: grads_of(init_params(config, study.task, key), batch))
        losses, grads = fn(jnp.stack(keys), batches)
    else:
        params = [init_params(config, study.task, key) for key in keys]
        params = jax.tree.map(lambda *xs: jnp.stack(xs), *params)
        losses, grads = jax.jit(jax.vmap(grads_of))(params, batches)
    records = []
    for i, seed in enumerate(study.seeds):
        g = jax.tree.map(lambda x: x[i], grads)
        total = float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(g))))
        records.append({"placement": placement, "depth": depth, "seed": seed,
                        "loss": float(losses[i]), "grad_norm": total,
                        **layer_grad_norms(g, depth)})
    return records
