"""Checks of config fields, one set for every config in the package.

Each raises a ValueError that names the field, repeats the value and says what is
valid, so a bad setting fails where it enters. This module imports nothing from
the package: any module, however low, can use it.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import numpy as np


def plain_scalars(config) -> None:
    """Replace the numpy scalars in the fields of the (frozen) dataclass `config`, inside
    tuples and lists too, by the Python int / float / bool / str they equal:
    `np.int64(64)`, `np.float32(0.1)`, `np.bool_(True)` are what arithmetic on numpy
    arrays hands back. The checks below then see one type per kind, and the config stays
    JSON-serialisable (checkpoints and run directories store it; `json` refuses
    np.float32 and np.int64) and equal to, and hashed like, the one built from Python
    numbers. Called first by the model, attention and run configs' `__post_init__`."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        plain = _plain(value)
        if plain is not value:
            object.__setattr__(config, field.name, plain)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if type(value) in (tuple, list):   # a namedtuple keeps its type and values
        items = [_plain(v) for v in value]
        if any(a is not b for a, b in zip(items, value)):
            return type(value)(items)
    return value


def is_int(value: Any) -> bool:
    """An int that is not a bool: Python counts True as 1, a config should not."""
    return isinstance(value, int) and not isinstance(value, bool)


def require(name: str, ok: bool, value: Any, valid: str) -> None:
    """Unless ok: ValueError "{name}={value!r} is not valid: {valid}"."""
    if not ok:
        raise ValueError(f"{name}={value!r} is not valid: {valid}")


def choice(name: str, value: Any, valid: tuple) -> None:
    """ValueError listing `valid` (their reprs) unless value is one of them."""
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, valid))}")


def positive_int(name: str, value: Any) -> None:
    """ValueError unless value is an int (not a bool) > 0."""
    if not is_int(value) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def positive_number(name: str, value: Any) -> None:
    """ValueError unless value is a finite real number (not a bool) > 0."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) \
            or not 0 < value < math.inf:
        raise ValueError(f"{name}={value!r} must be a positive number")


def probability(name: str, value: float) -> None:
    """ValueError unless value is a real number (not a bool) with 0 <= value < 1 (a
    dropout rate: 1 would drop everything)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value!r} must be in [0, 1)")


def boolean(name: str, value: Any) -> None:
    """ValueError unless value is True or False (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be True or False")


def int_at_least(name: str, value: Any, minimum: int, *, where: str = "") -> None:
    """ValueError "{name}={value!r} is invalid{where}: it must be an int >= {minimum}"
    unless value is an int (not a bool, as `is_int`) >= minimum; `where` qualifies the
    field, e.g. " for kind='local'"."""
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid{where}: it must be an int >= {minimum}")


def known_fields(cls, names, where: str) -> None:
    """ValueError naming each of `names` that is not a field of the dataclass `cls`,
    and listing the valid ones: dataclasses would raise a TypeError ("unexpected
    keyword argument")."""
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"{where}: {', '.join(map(repr, unknown))} "
                         f"{'is not a field' if len(unknown) == 1 else 'are not fields'} of "
                         f"{cls.__name__}; valid fields: {', '.join(valid)}")
