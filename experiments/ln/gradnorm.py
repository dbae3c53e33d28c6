"""Gradient norms at initialization, per layer (Xiong et al. 2020, arXiv 2002.04745).

Their Theorem 1 (sec. 3.3): for the last layer's FFN weights, post-LN's gradient
norm is O(d sqrt(ln d)) whatever the depth L, pre-LN's O(d sqrt(ln d / L)). Their
Fig. 3 measures it on a 6-6 encoder-decoder with Xavier init: for each layer's
FFN W2, the gradient averaged over mini-batches, then its Frobenius norm (the
norm of the *expected* gradient, which their theory bounds); post-LN's grows
toward the top, pre-LN's stays flat.

Here, for every (placement, depth, seed): a fresh model from that seed (the
study's `init`), `study.batches` real mini-batches of that data seed, their mean
gradient, and per layer the Frobenius norms of W^(2) (`mlp/down`), W^(1)
(`mlp/up`) and of all attention kernels together. Layers are listed bottom to top
per stack: an encoder-decoder's record lists the encoder's layers, then the
decoder's (`stacks`), so the last entry is the layer next to the output.

Initialisation and gradients are one compiled program per (placement, depth), the
seeds vmapped and the layers scanned (`scan_layers`): one compiled layer whatever
the depth, so a 24-24 model compiles about as fast as a 1-1 one.
"""
from __future__ import annotations

import re

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from experiments.ln.presets import GradNormStudy, Preset, model_config
from experiments.ln.sweep import cached_model
from transformer_jax.stacks import unstack_layers
from transformer_jax.training import compute_grads, get_task

_PARAM = re.compile(r"(?:(encoder|decoder)/)?layer_(\d+)/"
                    r"(?:(mlp)/(up|down)|(?:self_|cross_)?attention/\w+)/kernel")
GROUPS = ("w2", "w1", "attention")     # mlp/down, mlp/up, attention kernels
# The stacks of each task's model, bottom to top (BERT is an encoder, GPT a decoder;
# their parameter trees have no stack prefix).
STACKS = {"mlm": ("encoder",), "lm": ("decoder",), "seq2seq": ("encoder", "decoder")}


def layer_grad_norms(grads, task: str, num_layers: int) -> dict[str, list[float]]:
    """{group: [norm per layer, bottom to top, stack after stack]} of an unscanned
    gradient tree of `task`'s model with `num_layers` layers per stack."""
    stacks = STACKS[task]
    squares = {g: np.zeros(num_layers * len(stacks)) for g in GROUPS}
    for path, leaf in traverse_util.flatten_dict(grads, sep="/").items():
        match = _PARAM.search(path)
        if match is None:
            continue
        stack, layer, mlp, which = match.groups()
        index = (stacks.index(stack) if stack else 0) * num_layers + int(layer)
        group = "attention" if mlp is None else ("w2" if which == "down" else "w1")
        squares[group][index] += float(jnp.sum(jnp.square(leaf)))
    return {g: np.sqrt(s).tolist() for g, s in squares.items()}


def measure(preset: Preset, study: GradNormStudy, placement: str, depth: int,
            batches: dict, device=None) -> list[dict]:
    """One record per seed of `study.seeds`: per-layer norms of the mean gradient of a
    fresh model from that seed over that seed's batches (`batches`: {field: [seeds,
    study.batches, batch, ...]}), and the mean loss. Seeds are vmapped, batches
    scanned, in one compiled program per (placement, depth), run on `device`
    (default: the default device)."""
    config = model_config(preset, study.task, placement, depth, study.width).replace(
        scan_layers=True)
    model, task = cached_model(config), get_task(study.task)
    example = task.example_batch(config, 1, config.max_len)

    def mean_grad(key, seed_batches):
        params = task.apply(model.init, key, example, deterministic=True)["params"]

        def add(total, batch):
            loss, _, grads = compute_grads(model.apply, params, batch, None, task)
            return jax.tree.map(jnp.add, total, (loss, grads)), None
        zero = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(add, zero, seed_batches)
        return jax.tree.map(lambda x: x / study.batches, (loss, grads))

    keys = jnp.stack([jax.random.PRNGKey(s) for s in study.seeds])
    if device is not None:   # committed inputs: the program runs where they are
        keys, batches = jax.device_put((keys, batches), device)
    losses, grads = jax.device_get(jax.jit(jax.vmap(mean_grad))(keys, batches))
    records = []
    for i, seed in enumerate(study.seeds):
        g = unstack_layers(jax.tree.map(lambda x: x[i], grads))
        total = float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(g))))
        records.append({"placement": placement, "depth": depth, "seed": seed,
                        "stacks": list(STACKS[study.task]), "batches": study.batches,
                        "loss": float(losses[i]), "grad_norm": total,
                        **layer_grad_norms(g, study.task, depth)})
    return records
