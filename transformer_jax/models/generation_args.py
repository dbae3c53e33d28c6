"""Argument checks shared by the generators (`generate.py` for GPT,
`seq2seq_generate.py` for EncoderDecoder, `beam_search.py`), so that both accept
and refuse the same things: each bad argument is one ValueError naming it,
repeating the value and saying what is valid, before anything is traced.

Integers may be Python or numpy integers (a count read off an array is an
`np.int64`), never bools; they come back as Python ints, the form `jit`'s static
arguments and shapes want.
"""
from __future__ import annotations

import math
import numbers

import jax
import numpy as np

from transformer_jax.embeddings import check_ids


def is_integer(value) -> bool:
    """A Python or numpy integer, not a bool (Python counts True as 1; a token count
    or id should not)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _scalar(value):
    """A 0-d numpy or JAX array as its Python number (e.g. a temperature or an id kept
    as an array); anything else unchanged, for the checks below to judge."""
    if getattr(value, "ndim", None) == 0 and not isinstance(value, numbers.Number):
        try:
            return np.asarray(value).item()
        except TypeError:   # a tracer: not a concrete value
            return value
    return value


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def count(name: str, value) -> int:
    """`value` as a Python int if it is an integer >= 1 (max_new_tokens, beam_size)."""
    value = _scalar(value)
    if not is_integer(value) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return int(value)


def finite_nonnegative(name: str, value, note: str = "") -> float:
    """`value` as a Python float if it is a finite real number >= 0 (temperature,
    length_penalty); `note` says what 0 means."""
    value = _scalar(value)
    if not _is_real(value) or not 0.0 <= value < math.inf:   # NaN fails too
        raise ValueError(f"{name}={value!r} must be a finite number >= 0{note}")
    return float(value)


def token_ids(name: str, ids, axis: str, vocab_size: int) -> np.ndarray:
    """`ids` as int32 `[batch, axis]` (batch, axis >= 1), each in [0, vocab_size)."""
    try:
        ids = np.asarray(ids)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        raise ValueError(f"{name} must be concrete token ids, got a traced array: the "
                         "generators compile their own loop (jit), so call them outside "
                         "jit / vmap, with every row of the batch in one array") from None
    if ids.ndim != 2 or 0 in ids.shape:
        raise ValueError(f"{name} must be [batch, {axis}] with batch >= 1 and {axis} >= 1, "
                         f"got shape {ids.shape}")
    # The int32 cast would truncate float ids without a word.
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be integer token ids, got dtype {ids.dtype}")
    check_ids(name, ids, vocab_size, f"vocab_size={vocab_size}")
    return ids.astype(np.int32)


def token_id(name: str, value, vocab_size: int, *, optional: bool = False) -> int | None:
    """One special token id (bos_id, eos_id, pad_id) as a Python int in [0, vocab_size);
    None passes through when `optional` (e.g. no eos_id: rows run to max_new_tokens)."""
    if value is None and optional:
        return None
    value = _scalar(value)
    if not is_integer(value):
        raise ValueError(f"{name}={value!r} must be an integer token id in [0, {vocab_size}) "
                         f"(vocab_size={vocab_size})")
    check_ids(name, np.asarray(value), vocab_size, f"vocab_size={vocab_size}")
    return int(value)


def sampling(temperature, top_k, top_p, vocab_size: int) -> tuple[float, int | None, float | None]:
    """(temperature, top_k, top_p) as Python numbers: temperature finite and >= 0 (0 is
    greedy), top_k None or an integer in [1, vocab_size], top_p None or in (0, 1]."""
    temperature = finite_nonnegative("temperature", temperature, " (0 is greedy decoding)")
    top_k, top_p = _scalar(top_k), _scalar(top_p)
    if top_k is not None and (not is_integer(top_k) or not 1 <= top_k <= vocab_size):
        raise ValueError(f"top_k={top_k!r} must be None or an integer in "
                         f"[1, vocab_size={vocab_size}]")
    if top_p is not None and (not _is_real(top_p) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p={top_p!r} must be None or a number in (0, 1]")
    return (float(temperature), None if top_k is None else int(top_k),
            None if top_p is None else float(top_p))
