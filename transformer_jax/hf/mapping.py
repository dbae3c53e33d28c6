"""Name and layout maps between HF tensors and our parameter tree, both directions.

A `Layout` is a list of `Entry`s; each ties a few HF tensor names to a few of our
parameter paths ("/"-joined) with a function each way. Most entries are one to
one (a transpose, a reshape into heads); GPT-2's fused `c_attn` is one HF tensor
to three of ours. Shapes the HF file must have are derived from our model's
shapes by tracing the ours->HF function with `jax.eval_shape`, so every HF tensor
is checked before it is converted and the checks cannot drift from the maps.

Layouts (PyTorch `nn.Linear` stores `[out, in]`; GPT-2's `Conv1D` stores `[in, out]`):
  dense      weight [out, in]        -> kernel [in, out]            (transpose)
  heads_in   weight [H*hd, d]        -> kernel [d, H, hd]; bias [H*hd] -> [H, hd]
  heads_out  weight [d, H*hd]        -> kernel [H, hd, d]
  conv       weight [in, out]        -> kernel [in, out]            (as stored)
  fused_qkv  c_attn.weight [d, 3*H*hd] -> query/key/value kernels [d, H, hd]
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Entry:
    """A few HF tensor names tied to a few of our parameter paths, with the array
    conversion each way (e.g. HF `[out, in]` weight <-> our `[in, out]` kernel)."""
    hf: tuple[str, ...]
    ours: tuple[str, ...]
    to_ours: Callable[..., tuple]  # HF arrays -> our arrays
    to_hf: Callable[..., tuple]    # our arrays -> HF arrays


@dataclasses.dataclass(frozen=True)
class Layout:
    """Every `Entry` of one model family, plus tied duplicates and ignored buffers."""
    entries: tuple[Entry, ...]
    # (duplicate, original): HF may store a tied tensor twice (e.g. `lm_head.weight`
    # next to `wte.weight`); the duplicate is accepted only if it is equal.
    tied: tuple[tuple[str, str], ...] = ()
    # Regexes of tensors deliberately not used: buffers such as `position_ids` or
    # GPT-2's causal-mask `attn.bias`, and heads a pipeline discards.
    skip: tuple[str, ...] = ()


def _one(f):
    return lambda *xs: (f(*xs),)


def copy(hf: str, ours: str) -> Entry:
    """One tensor stored identically on both sides (same shape, e.g. an embedding `[V, d]`)."""
    return Entry((hf,), (ours,), _one(lambda x: x), _one(lambda x: x))


def norm(hf: str, ours: str) -> list[Entry]:
    """LayerNorm: weight `[d]` -> scale `[d]`, bias `[d]` -> bias `[d]`."""
    return [copy(f"{hf}.weight", f"{ours}/scale"), copy(f"{hf}.bias", f"{ours}/bias")]


def dense(hf: str, ours: str, bias: bool = True) -> list[Entry]:
    """`nn.Linear` [out, in] -> `nn.Dense` kernel [in, out]."""
    entries = [Entry((f"{hf}.weight",), (f"{ours}/kernel",), _one(lambda w: w.T), _one(lambda k: k.T))]
    return entries + [copy(f"{hf}.bias", f"{ours}/bias")] if bias else entries


def conv(hf: str, ours: str) -> list[Entry]:
    """GPT-2 `Conv1D` [in, out] is already our kernel layout."""
    return [copy(f"{hf}.weight", f"{ours}/kernel"), copy(f"{hf}.bias", f"{ours}/bias")]


def _xp(*xs):
    """numpy for real conversions (no XLA compile per shape); jax.numpy when
    traced by `jax.eval_shape` for the shape checks."""
    return np if all(isinstance(x, np.ndarray) for x in xs) else jnp


def _split_heads(x, heads):
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)


def _merge_heads(x):
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def heads_in(hf: str, ours: str, heads: int, transpose: bool = True) -> list[Entry]:
    """Q/K/V projection -> DenseGeneral kernel [d, H, hd], bias [H, hd]."""
    t = (lambda w: w.T) if transpose else (lambda w: w)
    return [Entry((f"{hf}.weight",), (f"{ours}/kernel",),
                  _one(lambda w: _split_heads(t(w), heads)), _one(lambda k: t(_merge_heads(k)))),
            Entry((f"{hf}.bias",), (f"{ours}/bias",),
                  _one(lambda b: _split_heads(b, heads)), _one(_merge_heads))]


def heads_out(hf: str, ours: str, heads: int, transpose: bool = True) -> list[Entry]:
    """Output projection -> DenseGeneral kernel [H, hd, d] (contracting both head axes)."""
    t = (lambda w: w.T) if transpose else (lambda w: w)
    return [Entry((f"{hf}.weight",), (f"{ours}/kernel",),
                  _one(lambda w: t(w).reshape(heads, -1, t(w).shape[-1])),
                  _one(lambda k: t(k.reshape(-1, k.shape[-1])))),
            copy(f"{hf}.bias", f"{ours}/bias")]


def fused_qkv(hf: str, ours: str, heads: int) -> list[Entry]:
    """GPT-2 `c_attn`: Conv1D [d, 3*d] whose output is [q | k | v] -> three kernels."""
    names = tuple(f"{ours}/{p}" for p in ("query", "key", "value"))

    def split(x):
        return tuple(_split_heads(part, heads) for part in _xp(x).split(x, 3, axis=-1))

    def merge(*parts):
        return (_xp(*parts).concatenate([_merge_heads(p) for p in parts], axis=-1),)

    return [Entry((f"{hf}.weight",), tuple(f"{n}/kernel" for n in names), split, merge),
            Entry((f"{hf}.bias",), tuple(f"{n}/bias" for n in names), split, merge)]


def _shape_problems(layout: Layout, tensors: dict, expected: dict) -> tuple[list[str], list[str]]:
    missing, wrong = [], []
    for e in layout.entries:
        absent = [n for n in e.hf if n not in tensors]
        missing += absent
        if absent:
            continue
        want = jax.eval_shape(e.to_hf, *(expected[p] for p in e.ours))
        for name, w in zip(e.hf, want):
            if tuple(tensors[name].shape) != tuple(w.shape):
                wrong.append(f"{name}: shape {tuple(tensors[name].shape)}, expected "
                             f"{tuple(w.shape)} (for our {', '.join(e.ours)})")
    return missing, wrong


def _tie_problems(layout: Layout, tensors: dict) -> list[str]:
    bad = []
    for dup, orig in layout.tied:
        if dup in tensors and orig in tensors and not (
                tensors[dup].shape == tensors[orig].shape
                and np.array_equal(np.asarray(tensors[dup]), np.asarray(tensors[orig]))):
            bad.append(f"{dup} should equal {orig} (tied weights) but differs; this library "
                       "ties them, so the checkpoint cannot be represented")
    return bad


def import_params(layout: Layout, tensors: dict, expected: dict, *, strict: bool,
                  source: str) -> tuple[dict, list[str]]:
    """(our flat params {path: array}, unused HF names). `tensors` are HF's {name:
    array}, `expected` our {path: ShapeDtypeStruct}; every HF shape is checked
    against the one our shapes imply before conversion. Every problem of the file
    is collected and raised together, naming each tensor."""
    tensors = dict(tensors)
    for dup, orig in layout.tied:  # some savers keep the duplicate and drop the original
        if orig not in tensors and dup in tensors:
            tensors[orig] = tensors[dup]
    covered = {n for e in layout.entries for n in e.hf} | {d for d, _ in layout.tied}
    skipped = [n for n in tensors if any(re.fullmatch(p, n) for p in layout.skip)]
    unused = sorted(n for n in tensors if n not in covered and n not in skipped)
    missing, wrong = _shape_problems(layout, tensors, expected)
    problems = [f"missing tensor {n}" for n in missing] + wrong + _tie_problems(layout, tensors)
    if strict:
        problems += [f"unused tensor {n}" for n in unused]
    if problems:
        raise ValueError(f"{source} does not match its config.json:\n  " + "\n  ".join(problems))
    if unused:
        warnings.warn(f"{source}: {len(unused)} tensors are not used by this model: "
                      f"{', '.join(unused)}", stacklevel=3)
    params = {}
    for e in layout.entries:
        for path, value in zip(e.ours, e.to_ours(*(np.asarray(tensors[n]) for n in e.hf))):
            params[path] = jnp.asarray(np.asarray(value, expected[path].dtype))
    uncovered = sorted(set(expected) - set(params))
    if uncovered:  # a defect of the layout, not of the file
        raise AssertionError(f"layout leaves our parameters unset: {uncovered}")
    return params, unused


def export_params(layout: Layout, params: dict, dtype=None) -> dict[str, np.ndarray]:
    """Our flat params {path: array} -> HF tensors {name: numpy array} in HF's shapes
    (e.g. kernels `[in, out]` -> weights `[out, in]`); refuses parameters the layout
    does not cover."""
    covered = {p for e in layout.entries for p in e.ours}
    extra = sorted(set(params) - covered)
    if extra:
        raise ValueError(f"parameters {extra} have no place in the HF layout; the model "
                         "has parts HF BERT / GPT-2 do not")
    missing = sorted(covered - set(params))
    if missing:
        raise ValueError(f"parameters {missing} are missing from the tree being exported")
    out = {}
    for e in layout.entries:
        for name, value in zip(e.hf, e.to_hf(*(np.asarray(params[p]) for p in e.ours))):
            out[name] = value.astype(dtype) if dtype is not None else value
    return out
