"""Training diagnostics: gradient/update norms per layer, parameter counts, FLOPs and MFU.

Norms are computed inside the jitted step (a handful of scalars). Throughput and
model FLOPs utilisation (MFU, Chowdhery et al. 2022, arXiv 2204.02311, app. B) are
computed on the host from wall-clock time, outside the step.
"""
from __future__ import annotations

import re
import time

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp

from transformer_jax.config import TransformerConfig
from transformer_jax.models.registry import family_of
from transformer_jax.scan_names import SCAN_BLOCK, SCAN_NAME

_LAYER = re.compile(r"layer_\d+")


def group_name(path: tuple[str, ...]) -> str:
    """"decoder/layer_3" for anything inside that layer; otherwise the module path
    ("embeddings/token", "mlm_head", "decoder/final_norm"): one group per layer plus
    the embeddings and heads, so a few dozen scalars even for deep models."""
    for i, part in enumerate(path):
        if _LAYER.fullmatch(part):
            return "/".join(path[:i + 1])
    return "/".join(path[:-1]) or path[-1]


def _scanned_prefix(path: tuple[str, ...]) -> str | None:
    """"decoder" for a `scan_layers` leaf "decoder/layers/block/...", else None."""
    for i in range(len(path) - 2):
        if path[i] == SCAN_NAME and path[i + 1] == SCAN_BLOCK:
            return "/".join(path[:i])
    return None


def _sum_squares(x) -> jax.Array:
    return jnp.sum(jnp.square(x.astype(jnp.float32)))


def global_norm(tree) -> jax.Array:
    """sqrt of the sum of squares of every leaf, accumulated in float32."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum((_sum_squares(x) for x in leaves), jnp.zeros((), jnp.float32)))


def grouped_norms(tree) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(global norm, {group_name: L2 norm of that group's leaves}) of a parameter-shaped
    tree; the global norm reuses the groups' sums, one reduction per leaf in all."""
    squares: dict[str, jax.Array] = {}
    for path, leaf in traverse_util.flatten_dict(tree).items():
        path = tuple(map(str, path))
        stacked = _scanned_prefix(path)
        if stacked is None:
            name = group_name(path)
            squares[name] = squares.get(name, 0.0) + _sum_squares(leaf)
            continue
        # `scan_layers`: one leaf holds every layer along axis 0; report each layer
        # under the name the unrolled stack would give it.
        per_layer = jnp.sum(jnp.square(leaf.astype(jnp.float32)).reshape(leaf.shape[0], -1), 1)
        for i in range(leaf.shape[0]):
            name = f"{stacked}/layer_{i}"
            squares[name] = squares.get(name, 0.0) + per_layer[i]
    total = jnp.sqrt(sum(squares.values(), jnp.zeros((), jnp.float32)))
    return total, {name: jnp.sqrt(s) for name, s in squares.items()}


def count_params(params, *, exclude_position: bool = False) -> int:
    """Number of parameters; `exclude_position` drops learned position tables (nanoGPT
    leaves them out of the FLOP count: a lookup does no multiply-adds)."""
    total = 0
    for path, leaf in traverse_util.flatten_dict(params).items():
        if exclude_position and "position" in map(str, path[:-1]):
            continue
        total += int(leaf.size)
    return total


def model_flops_per_token(config: TransformerConfig, seq_len: int | None = None,
                          num_params: int | None = None) -> int:
    """Training FLOPs per token, 6 N + 12 L d T (Kaplan et al. 2020, arXiv 2001.08361,
    sec. 2.1; nanoGPT's `estimate_mfu`): 2 N forward and 4 N backward multiply-adds
    per parameter, plus attention scores and values over T positions in L layers.

    N excludes position embeddings (counted from `models.build(config)` unless
    given); T is `seq_len` (default max_len). L is the family's `attention_layers`
    (`models.registry`): for the encoder-decoder, the encoder's and both decoder attentions and a token is a target token (source and
    target of similar length). Dropout, softmax and norms are not counted."""
    if num_params is None:
        from transformer_jax.training.state import init_params  # models are heavy; lazy
        params = jax.eval_shape(lambda k: init_params(config, k)[0], jax.random.key(0))
        num_params = count_params(params, exclude_position=True)
    seq = config.max_len if seq_len is None else seq_len
    return 6 * num_params + 12 * family_of(config).attention_layers(config) * config.d_model * seq


def program_bytes(compiled) -> int | None:
    """Device bytes a compiled program needs, by its own account (arguments + outputs +
    temporaries - donated aliases): exact for the program, no allocation needed.
    None where the backend gives no memory analysis."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
               - m.alias_size_in_bytes)


def measure_matmul_peak(dtype: str = "bfloat16", size: int = 4096, repeats: int = 5) -> float:
    """Achievable FLOP/s of this device: best time of a jitted `size`^2 matmul
    (2 size^3 FLOPs) over `repeats` runs after a warm-up. A stand-in peak for MFU
    when the datasheet number is unknown (e.g. on CPU)."""
    if size <= 0 or repeats <= 0:
        raise ValueError(f"size={size!r} and repeats={repeats!r} must be positive")
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (size, size), jnp.dtype(dtype))
    b = jax.random.normal(kb, (size, size), jnp.dtype(dtype))
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best


def throughput(num_tokens: int, seconds: float, flops_per_token: float,
               peak_flops: float | None = None) -> dict[str, float]:
    """{"tokens_per_sec", "model_flops_per_sec", "mfu"} for `num_tokens` processed in
    `seconds`; mfu only with a peak (FLOP/s, datasheet or `measure_matmul_peak`)."""
    if seconds <= 0:
        raise ValueError(f"seconds={seconds!r} must be positive")
    tokens_per_sec = num_tokens / seconds
    out = {"tokens_per_sec": tokens_per_sec, "model_flops_per_sec": tokens_per_sec * flops_per_token}
    if peak_flops:
        out["mfu"] = out["model_flops_per_sec"] / peak_flops
    return out
