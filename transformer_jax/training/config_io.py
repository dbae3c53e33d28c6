"""Model configs <-> JSON-ready dicts, so a checkpoint records the model it holds.

The dict names the config class, so `config_from_dict` rebuilds a `GPTConfig`
and not merely a `TransformerConfig`:
    {"class": "GPTConfig", "fields": {..., "attention": {"kind": "xla", ...}}}
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from transformer_jax.attention.config import AttentionConfig
from transformer_jax.config import TransformerConfig
# The storable configs: every registered family's, and the base (looked up per call,
# so a family registered later is stored too).
from transformer_jax.models.registry import config_classes


def config_to_dict(config: TransformerConfig) -> dict[str, Any]:
    """A JSON-serialisable dict of `config` (tuples become lists)."""
    name, classes = type(config).__name__, config_classes()
    if classes.get(name) is not type(config) or not dataclasses.is_dataclass(config):
        raise ValueError(f"config of type {name} cannot be stored; expected one of "
                         f"{', '.join(classes)}")
    fields = dataclasses.asdict(config)
    fields["attention"] = {k: list(v) if isinstance(v, tuple) else v
                           for k, v in fields["attention"].items()}
    return {"class": name, "fields": fields}


def _build(cls, fields: Mapping[str, Any], where: str):
    valid = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - set(valid))
    if unknown:
        raise ValueError(f"{where} has unknown fields {unknown} for {cls.__name__}; "
                         f"valid fields: {', '.join(valid)}")
    # JSON has no tuples: a field whose default is a tuple gets its tuple back.
    kwargs = {k: tuple(v) if isinstance(v, list) and isinstance(valid[k].default, tuple) else v
              for k, v in fields.items()}
    return cls(**kwargs)


def config_from_dict(d: Mapping[str, Any]) -> TransformerConfig:
    """Inverse of `config_to_dict`; ValueError on an unknown class or field."""
    if not isinstance(d, Mapping) or "class" not in d or "fields" not in d:
        raise ValueError(f"config dict {d!r} must have keys 'class' and 'fields'")
    classes = config_classes()
    if d["class"] not in classes:
        raise ValueError(f"config class {d['class']!r} is unknown; valid: {', '.join(classes)}")
    fields = dict(d["fields"])
    if isinstance(fields.get("attention"), Mapping):
        fields["attention"] = _build(AttentionConfig, fields["attention"], "config.attention")
    return _build(classes[d["class"]], fields, "config")


def config_diff(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two `config_to_dict` results."""
    diffs = []
    if expected.get("class") != found.get("class"):
        diffs.append(f"class: expected {expected.get('class')!r}, found {found.get('class')!r}")
    a, b = _flatten(expected.get("fields", {})), _flatten(found.get("fields", {}))
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(f"{key}: expected {a.get(key, '<absent>')!r}, found {b.get(key, '<absent>')!r}")
    return diffs


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out
