"""Old import paths of modules that moved, kept for one release with a warning.

`forward(__name__, "new.module")` returns a module `__getattr__` (PEP 562) that
imports the new module on use, warns, and hands out its names, so
`from transformer_jax.training.runner import train` keeps working while the
layering (tests/test_layering.py) stays one-way: nothing is imported upwards
until an old name is actually used.
"""
from __future__ import annotations

import importlib
import warnings


def forward(old: str, new: str):
    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        # Every use warns; Python's warning filters show it once per calling line.
        warnings.warn(f"{old} moved to {new}; import it from there (the old path goes "
                      "in the next release)", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(new), name)
    return __getattr__
