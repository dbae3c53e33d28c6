"""The files of a run directory besides the checkpoints: strict-JSON metrics and
summary, and their truncation on resume (the loss plot is `run/plots.py`); checks of
the paths a command is given (an output directory, a file of inputs).

JSON has no NaN or Infinity (RFC 8259, sec. 6); Python's `json` writes them anyway,
and `jq` and strict parsers then reject the whole file. A non-finite value is
written as `null`, and the record lists the keys it nulled under "nonfinite".
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax
import numpy as np


def strict_json(record: dict) -> dict:
    """`record` with array scalars as floats and non-finite floats as None, the nulled
    keys listed under "nonfinite" (nested dicts are cleaned, and flagged by their key)."""
    out, nonfinite = {}, []
    for key, value in record.items():
        if isinstance(value, dict):
            value = strict_json(value)
            nonfinite += [f"{key}.{k}" for k in value.pop("nonfinite", [])]
        elif isinstance(value, (np.floating, np.integer, np.ndarray, jax.Array)) and np.ndim(value) == 0:
            value = value.item() if isinstance(value, np.integer) else float(value)
        if isinstance(value, float) and not math.isfinite(value):
            value = None
            nonfinite.append(key)
        out[key] = value
    if nonfinite:
        out["nonfinite"] = nonfinite
    return out


def dumps(record: dict, **kwargs) -> str:
    """Strict JSON text of `record` (see `strict_json`); never NaN or Infinity."""
    return json.dumps(strict_json(record), allow_nan=False, **kwargs)


class MetricsLog:
    """metrics.jsonl: one strict-JSON line per logged step and per evaluation."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def write(self, record: dict) -> None:
        """Append one JSON line."""
        with self.path.open("a") as f:
            f.write(dumps(record) + "\n")

    def read(self) -> list[dict]:
        """Every record, in order ([] without a file), less a partial last line (see
        `_parse`)."""
        return self._parse()[0]

    def _parse(self) -> tuple[list[dict], bool]:
        """(records, whether a partial last line was dropped). A process killed while
        writing leaves its last line cut short: that record was never complete, so it
        is dropped. Any other line that is not JSON is damage: ValueError naming the
        file and line."""
        if not self.path.is_file():
            return [], False
        # Records are ASCII JSON, so a byte that is not UTF-8 is damage of its line
        # (decoded as U+FFFD, then refused below), not an error without a file name.
        text = self.path.read_bytes().decode("utf-8", errors="replace")
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        records = []
        for i, (n, line) in enumerate(lines):
            try:
                if "\ufffd" in line:
                    raise json.JSONDecodeError("a byte that is not UTF-8", line,
                                               line.index("\ufffd"))
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                if i == len(lines) - 1:
                    return records, True
                raise ValueError(f"{self.path}:{n}: not valid JSON ({e.msg}); each line of "
                                 "metrics.jsonl is one record (a damaged file: delete or repair "
                                 "that line)") from None
        return records, False

    def truncate(self, step: int) -> int:
        """Keep what a run resumed at `step` (its checkpoint) has already done: records
        up to `step`, less the final evaluation of the session that stopped there (and
        a partial last line). Returns how many records were dropped; the file is
        replaced atomically."""
        records, partial = self._parse()
        kept = [r for r in records if r["step"] <= step and r.get("kind") != "final_eval"]
        if partial or len(kept) != len(records):
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))
            os.replace(tmp, self.path)
        return len(records) - len(kept)


def write_summary(path: Path, summary: dict) -> None:
    """summary.json, strict JSON."""
    Path(path).write_text(dumps(summary, indent=2))


def input_lines(path, flag: str = "--input-file") -> list[str]:
    """The non-blank lines of a UTF-8 file of inputs (`generate`, `predict`);
    ValueError naming `flag` if it is missing, not UTF-8, or has no such line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{flag} {str(path)!r} is not a file")
    try:
        # utf-8-sig: a byte-order mark (Notepad's UTF-8) is not part of the first input
        lines = [line for line in path.read_text(encoding="utf-8-sig").splitlines()
                 if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {str(path)!r} is not UTF-8 text ({e.reason} at byte "
                         f"{e.start})") from e
    if not lines:
        raise ValueError(f"{flag} {str(path)!r} has no non-blank line")
    return lines


def check_output_dir(path, flag: str = "--out", parser=None) -> Path:
    """`path` as a directory a command can create and write into (nothing is created
    here). If it is a file, lies under a file, or its nearest existing directory is not
    writable: ValueError naming `flag` and the path, or, given an argparse `parser`,
    that message as its usage error (exit status 2)."""
    path = Path(path)
    problem = _output_dir_problem(path, flag)
    if problem and parser is not None:
        parser.error(problem)
    if problem:
        raise ValueError(problem)
    return path


def _output_dir_problem(path: Path, flag: str) -> str | None:
    if path.exists() and not path.is_dir():
        return f"{flag} {str(path)!r} is a file, not a directory; choose another {flag}"
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return (f"{flag} {str(path)!r} cannot be created: {str(parent)!r} is a file; "
                f"choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        return (f"{flag} {str(path)!r} cannot be written: no write permission on "
                f"{str(parent)!r}; choose another {flag}")
    return None
