"""Checkpoints with Orbax: the train state plus a JSON record of the run.

Each step directory holds two Orbax items:
    state   the TrainState's arrays (step, params, opt_state, rng)
    meta    JSON: {"format_version", "step", "config" (config_to_dict), "metadata"
            (caller's: tokenizer files, data iterator state, ...), "state_spec"
            (path -> [shape, dtype]), "checksums" (path -> crc32 of the bytes)}
Restoring checks, before reading any array, that the checkpoint is complete, was
written for the same model (config) and has the target's shapes and dtypes, and
afterwards that every array's checksum matches; each failure is a ValueError
naming the path and the mismatch. Nothing is written when restoring, and `save`
never overwrites an existing step. Saves are synchronous: the train step donates
its state, so a background save could read buffers that the next step reuses.
"""
from __future__ import annotations

import json
import os
import zlib
from typing import Any, Mapping

import flax.serialization as serialization
import flax.traverse_util as traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp

from transformer_jax.config import TransformerConfig
from transformer_jax.training.config_io import config_diff, config_to_dict

FORMAT_VERSION = 1
STATE, META = "state", "meta"


def _flat(state) -> dict[str, Any]:
    return traverse_util.flatten_dict(serialization.to_state_dict(state), sep="/")


def state_spec(state) -> dict[str, list]:
    """{"params/decoder/layer_0/mlp/up/kernel": [[32, 64], "float32"], ...}"""
    return {k: [list(np.shape(v)), str(np.dtype(v.dtype)) if hasattr(v, "dtype")
                else type(v).__name__] for k, v in _flat(state).items()}


def _checksums(state) -> dict[str, int] | None:
    flat = _flat(state)
    if not all(getattr(v, "is_fully_addressable", True) for v in flat.values()):
        return None  # multi-host shards: no single process sees every byte
    return {k: zlib.crc32(np.ascontiguousarray(jax.device_get(v)).reshape(-1).view(np.uint8))
            for k, v in flat.items()}


def _spec_mismatches(expected: Mapping, found: Mapping) -> list[str]:
    out = [f"{k}: missing from the checkpoint" for k in sorted(set(expected) - set(found))]
    out += [f"{k}: in the checkpoint but not in the target" for k in sorted(set(found) - set(expected))]
    out += [f"{k}: target {expected[k][0]} {expected[k][1]}, checkpoint {found[k][0]} {found[k][1]}"
            for k in sorted(set(expected) & set(found)) if list(expected[k]) != list(found[k])]
    return out


def _abstract(state_dict):
    # Keep the target's sharding when it has one, so restored arrays land where it lives.
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                                       sharding=getattr(x, "sharding", None)),
                        state_dict)


def _manager(directory: str, **options) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, **options)
    return ocp.CheckpointManager(directory, options=opts, item_names=(STATE, META))


class Checkpointer:
    """Saves at steps divisible by `save_interval_steps` (or when forced), keeps the newest
    `max_to_keep`. Arrays are stored with their shapes and dtypes and restored into a
    target of the same shapes (or onto another sharding of them). Use as a context
    manager, or call `close()`."""

    def __init__(self, directory: str | os.PathLike, *, save_interval_steps: int = 1,
                 max_to_keep: int | None = 3, read_only: bool = False):
        if not isinstance(save_interval_steps, int) or save_interval_steps < 1:
            raise ValueError(f"save_interval_steps={save_interval_steps!r} must be a positive integer")
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
            raise ValueError(f"max_to_keep={max_to_keep!r} must be a positive integer or None (keep all)")
        self.directory = os.path.abspath(os.fspath(directory))
        if read_only and not os.path.isdir(self.directory):
            raise ValueError(f"checkpoint directory {self.directory} does not exist")
        self.save_interval_steps = save_interval_steps
        # The interval is applied here (step % interval == 0), not by Orbax, whose
        # policy also saves the first step it is shown.
        self._manager = _manager(self.directory, read_only=True) if read_only else \
            _manager(self.directory, max_to_keep=max_to_keep, create=True)

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release Orbax's manager (its threads and file handles)."""
        self._manager.close()

    def all_steps(self) -> list[int]:
        """The saved steps, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def delete_after(self, step: int) -> list[int]:
        """Deletes the checkpoints newer than `step` (a diverged run's, which hold the
        update that led to the divergence); returns their steps."""
        newer = [s for s in self.all_steps() if s > step]
        for s in newer:
            self._manager.delete(s)
        return newer

    def save(self, step: int, state, *, config: TransformerConfig | None = None,
             metadata: Mapping[str, Any] | None = None, force: bool = False) -> bool:
        """Save `state` as `step` if the interval says so (or `force`). Returns whether it
        saved; an existing step is never overwritten. `metadata` must be JSON-serialisable."""
        step = int(step)
        if step in self._manager.all_steps() or not (force or step % self.save_interval_steps == 0):
            return False
        try:
            json.dumps(dict(metadata or {}))
        except (TypeError, ValueError) as e:
            raise ValueError(f"checkpoint metadata for step {step} is not JSON-serialisable: {e}") from e
        record = {"format_version": FORMAT_VERSION, "step": step,
                  "config": None if config is None else config_to_dict(config),
                  "metadata": dict(metadata or {}), "state_spec": state_spec(state),
                  "checksums": _checksums(state)}
        state_dict = serialization.to_state_dict(state)
        return bool(self._manager.save(step, force=True, args=ocp.args.Composite(
            **{STATE: ocp.args.StandardSave(state_dict), META: ocp.args.JsonSave(record)})))

    def _step_path(self, step: int | None) -> tuple[int, str]:
        steps = self.all_steps()
        if not steps:
            raise ValueError(f"no complete checkpoint in {self.directory} "
                             f"(entries: {sorted(os.listdir(self.directory))})")
        if step is None:
            step = steps[-1]
        if step not in steps:
            raise ValueError(f"checkpoint step {step} not found in {self.directory}; "
                             f"available steps: {steps}")
        path = os.path.join(self.directory, str(step))
        missing = [item for item in (STATE, META) if not os.path.isdir(os.path.join(path, item))]
        if missing:
            raise ValueError(f"checkpoint {path} is partial: items {missing} are missing")
        return step, path

    def read_metadata(self, step: int | None = None) -> dict:
        """The JSON record of `step` (default: latest), without reading any array."""
        step, path = self._step_path(step)
        try:
            record = self._manager.restore(step, args=ocp.args.Composite(
                **{META: ocp.args.JsonRestore()}))[META]
        except Exception as e:  # Orbax raises many types for unreadable files
            raise ValueError(f"checkpoint {path} is corrupted: its '{META}' item cannot be read "
                             f"({_brief(e)})") from e
        if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"checkpoint {path} has no valid metadata (expected format_version "
                             f"{FORMAT_VERSION}, found {record!r:.200})")
        return record

    def restore(self, target, *, step: int | None = None,
                config: TransformerConfig | None = None) -> tuple[Any, dict]:
        """-> (state shaped like `target`, JSON record). `target` is a TrainState of arrays
        or of `jax.ShapeDtypeStruct`s (`abstract_train_state`), whose every shape and
        dtype must equal the stored ones (e.g. "params/.../kernel": `[32, 64]` float32);
        with `config`, the stored config must equal it."""
        step, path = self._step_path(step)
        record = self.read_metadata(step)
        if config is not None:
            if record.get("config") is None:   # saved without config=: nothing to compare
                raise ValueError(f"checkpoint {path} records no model config (it was saved "
                                 f"without config=), so it cannot be checked against the "
                                 f"{type(config).__name__} given; restore it without config=")
            diffs = config_diff(config_to_dict(config), record["config"])
            if diffs:
                raise ValueError(f"checkpoint {path} was written for a different model: "
                                 + "; ".join(diffs))
        mismatches = _spec_mismatches(state_spec(target), record["state_spec"])
        if mismatches:
            raise ValueError(f"checkpoint {path} does not match the target state: "
                             + "; ".join(mismatches[:10])
                             + (f"; ... ({len(mismatches)} in all)" if len(mismatches) > 10 else ""))
        target_dict = serialization.to_state_dict(target)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                **{STATE: ocp.args.StandardRestore(_abstract(target_dict))}))[STATE]
        except Exception as e:
            raise ValueError(f"checkpoint {path} is corrupted: its '{STATE}' item cannot be read "
                             f"({_brief(e)})") from e
        _verify(path, restored, record.get("checksums"))
        return serialization.from_state_dict(target, restored), record


def _brief(error: Exception, limit: int = 300) -> str:
    """The storage error's gist: its first line, without the TensorStore spec (a JSON
    dump of every driver option) that follows; the whole error stays the `__cause__`."""
    text = str(error).split("\n", 1)[0]
    for tail in (" [tensorstore_spec=", " See full TensorStore details"):
        text = text.split(tail, 1)[0]
    text = text.strip()
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"{type(error).__name__}: {text}"


def _verify(path: str, restored, expected: Mapping[str, int] | None) -> None:
    if expected is None:
        return
    found = _checksums(restored) or {}
    bad = sorted(k for k, v in expected.items() if k in found and found[k] != v)
    if bad:
        raise ValueError(f"checkpoint {path} is corrupted: checksums differ for {bad[:10]}")


def load_metadata(directory: str | os.PathLike, step: int | None = None) -> dict:
    """The JSON record of a checkpoint (default: latest), e.g. to rebuild its model
    with `config_from_dict(record["config"])` before restoring the state."""
    with Checkpointer(directory, read_only=True) as ckpt:
        return ckpt.read_metadata(step)


def restore_checkpoint(directory: str | os.PathLike, target, *, step: int | None = None,
                       config: TransformerConfig | None = None) -> tuple[Any, dict]:
    """Read-only `Checkpointer(directory).restore(target, step=..., config=...)`."""
    with Checkpointer(directory, read_only=True) as ckpt:
        return ckpt.restore(target, step=step, config=config)
