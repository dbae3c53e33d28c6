"""Per-run records: JSON lines in the results directory, the unit of resumption.

Every record carries the fingerprint of the settings it came from; a re-run
reads the records that match the current settings and skips their work, so an
interrupted benchmark resumes where it stopped and a changed preset starts over
without deleting anything.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable

import numpy as np

GRADNORM, RUNS, GROUPS, CHECKS = "gradnorm.jsonl", "runs.jsonl", "groups.jsonl", "checks.jsonl"


def _clean(value):
    # JSON has no NaN/inf: non-finite numbers become null, numpy scalars plain floats.
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_clean(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def read(out_dir: str | os.PathLike, name: str, fingerprints: Iterable[str]) -> list[dict]:
    """The records of `name` whose fingerprint is one of `fingerprints`; a torn last
    line (an interrupted write) is ignored."""
    path, wanted = Path(out_dir) / name, set(fingerprints)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("fingerprint") in wanted:
            records.append(record)
    return records


def append(out_dir: str | os.PathLike, name: str, records: Iterable[dict]) -> None:
    """Append records (one line each) and flush them to disk."""
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
    with path.open("a") as f:
        if torn:   # end the interrupted line, so that it alone is lost
            f.write("\n")
        for record in records:
            f.write(json.dumps(_clean(record), separators=(",", ":")) + "\n")
        f.flush()
        os.fsync(f.fileno())
