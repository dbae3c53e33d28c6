"""The range check shared by both boundaries where token ids enter (numpy only; it
lives with the data package, the lowest layer both boundaries may import).

Ids are checked where data enters (`data.batches.validate_token_ids`) and where a
model reads them (`embeddings.check_ids`); each words its own error, naming the
setting its caller knows (the tokenizer's vocabulary, or the model's config
field), but both find the offending id here, so they cannot disagree on which
ids are bad.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class OutOfRange(NamedTuple):
    """The first id outside [0, size) in row-major order, and how many there are."""
    index: tuple[int, ...]  # its position in the array, one int per axis
    value: int              # the id there
    count: int              # number of bad ids in the whole array


def first_out_of_range(ids: np.ndarray, size: int) -> OutOfRange | None:
    """The first entry of int array `ids` (any shape) outside [0, size), or None if
    every entry lies inside (an empty array included)."""
    bad = (ids < 0) | (ids >= size)
    if not bad.any():
        return None
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    return OutOfRange(index, int(ids[index]), int(bad.sum()))
