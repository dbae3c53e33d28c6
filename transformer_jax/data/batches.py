"""Batching shared by all tasks: id validation, seeded examples, resumable iteration.

Exact resume: example ``g`` of a dataset is a pure function of (dataset, seed,
g), drawn from its own generator ``example_rng(seed, g)``; the global batch at
step ``i`` holds examples ``i*B .. i*B+B-1``. So a checkpoint only has to store
``{"step", "seed", "batch_size"}`` and any process can rebuild any batch, or
only its slice of it, without replaying the stream.
"""

from __future__ import annotations

import abc
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from transformer_jax.data.ids import first_out_of_range

Batch = dict[str, np.ndarray]


def validate_token_ids(ids, vocab_size: int, field: str = "input_ids") -> np.ndarray:
    """Check that every id lies in [0, vocab_size); returns ``ids`` as an array.

    An out-of-range id would be silently clamped or wrap around in a JAX
    embedding gather, so it is an error here, at the boundary where data enters.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) \
            or vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size!r} must be a positive int")
    arr = np.asarray(ids)
    if arr.size == 0:
        return arr
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{field} must hold integer token ids, got dtype {arr.dtype}")
    bad = first_out_of_range(arr, vocab_size)
    if bad is not None:
        pos = bad.index[0] if len(bad.index) == 1 else bad.index
        raise ValueError(
            f"{field} has token id {bad.value} at position {pos} outside the "
            f"valid range [0, {vocab_size}) ({bad.count} bad id(s) in total); "
            "the tokenizer's vocabulary does not match the model's vocab_size")
    return arr


def example_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for example ``index``: independent streams per (seed, index)."""
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def _check_nonneg_int(field: str, value, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{field}={value!r} must be an int >= {minimum}")


def local_example_indices(step: int, batch_size: int, process_index: int = 0,
                          process_count: int = 1) -> np.ndarray:
    """Global example indices `[batch_size // process_count]` int that process
    ``process_index`` builds at ``step``.

    The global batch is split into ``process_count`` contiguous slices, so the
    concatenation over processes is exactly the single-process batch.
    """
    _check_nonneg_int("step", step)
    _check_nonneg_int("batch_size", batch_size, 1)
    _check_nonneg_int("process_count", process_count, 1)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index!r} must lie in [0, {process_count})")
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by "
                         f"process_count={process_count}; use a multiple of {process_count}")
    local = batch_size // process_count
    return step * batch_size + process_index * local + np.arange(local)


class ExampleDataset(abc.ABC):
    """A dataset whose examples are pure functions of (seed, index).

    Subclasses set ``fields`` (the batch keys, in order) and ``model_vocab_size``
    (ids are validated against it) and implement :meth:`example`, which returns one
    example's arrays (e.g. ``input_ids`` `[L]`); :meth:`batch` stacks them into
    `[B, L]` (`[B]` for per-example scalars such as ``nsp_labels``).
    """

    fields: tuple[str, ...] = ()
    id_fields: tuple[str, ...] = ()  # fields holding token ids, validated per batch
    model_vocab_size: int

    @abc.abstractmethod
    def example(self, index: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Arrays of one example; may hold extra diagnostic keys beyond ``fields``."""

    def batch(self, step: int, batch_size: int, seed: int = 0, process_index: int = 0,
              process_count: int = 1) -> Batch:
        """This process's slice of the global batch at ``step``: arrays [B_local, ...]."""
        _check_nonneg_int("seed", seed)
        idx = local_example_indices(step, batch_size, process_index, process_count)
        examples = [self.example(int(i), seed) for i in idx]
        out = {k: np.stack([e[k] for e in examples]) for k in self.fields}
        for k in self.id_fields:
            validate_token_ids(out[k], self.model_vocab_size, field=k)
        return out


class BatchIterator:
    """Iterator over ``dataset.batch(step, ...)`` whose position fits in a checkpoint.

    ``state()`` is a small JSON-able dict; ``restore(state)`` continues exactly
    where it was taken, also on a different number of processes (the global
    batch does not depend on ``process_count``).
    """

    def __init__(self, dataset: ExampleDataset, batch_size: int, seed: int = 0,
                 step: int = 0, process_index: int = 0, process_count: int = 1):
        _check_nonneg_int("seed", seed)
        local_example_indices(step, batch_size, process_index, process_count)  # validates
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.step = step
        self.process_index = process_index
        self.process_count = process_count

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = self.dataset.batch(self.step, self.batch_size, self.seed,
                                   self.process_index, self.process_count)
        self.step += 1
        return batch

    def state(self) -> dict[str, int]:
        """``{"step", "seed", "batch_size"}``: all a checkpoint needs to resume."""
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size}

    def restore(self, state: Mapping[str, Any]) -> "BatchIterator":
        """Resume from :meth:`state`; the stored seed wins, batch_size must match."""
        for key in ("step", "seed", "batch_size"):
            if key not in state:
                raise ValueError(f"iterator state {dict(state)!r} lacks {key!r}; "
                                 "expected keys step, seed, batch_size")
        if int(state["batch_size"]) != self.batch_size:
            raise ValueError(
                f"state batch_size={state['batch_size']} differs from this iterator's "
                f"batch_size={self.batch_size}; resuming would shift every example")
        _check_nonneg_int("step", int(state["step"]))
        _check_nonneg_int("seed", int(state["seed"]))
        self.step, self.seed = int(state["step"]), int(state["seed"])
        return self


def shard_batch(batch: Mapping[str, np.ndarray], num_devices: int) -> Batch:
    """Reshape every array `[B, ...]` -> `[num_devices, B // num_devices, ...]` (for
    pmap-style per-device leading axes); ValueError if B does not divide."""
    _check_nonneg_int("num_devices", num_devices, 1)
    sizes = {k: np.shape(v)[0] for k, v in batch.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"batch arrays disagree on the leading batch dimension: {sizes}")
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.shape[0] % num_devices:
            raise ValueError(
                f"batch field {k!r} has batch dimension {v.shape[0]}, which is not "
                f"divisible by num_devices={num_devices}; use a batch_size that is a "
                f"multiple of {num_devices}")
        out[k] = v.reshape(num_devices, v.shape[0] // num_devices, *v.shape[1:])
    return out


def pad_to(values: Sequence[int] | np.ndarray, length: int, pad_value: int,
           dtype=np.int32) -> np.ndarray:
    """Right-pad a 1-D sequence `[n]` to `[length]` (n <= length) with ``pad_value``."""
    out = np.full(length, pad_value, dtype=dtype)
    out[:len(values)] = values
    return out
