"""The package layering: imports flow one way,
building blocks -> models -> (hf | training) -> parallel -> run -> experiments.

Every `import` and `from ... import` in every module is read from its source (the
lazy ones inside functions too) and mapped to the layer of the module it names.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# layer -> the layers it may import (itself included)
ALLOWED = {
    "blocks": {"blocks"},
    "models": {"blocks", "models"},
    "hf": {"blocks", "models", "hf"},
    "training": {"blocks", "models", "training"},
    "parallel": {"blocks", "models", "training", "parallel"},
    "run": {"blocks", "models", "hf", "training", "parallel", "run"},
    "experiments": {"blocks", "models", "hf", "training", "parallel", "run", "experiments"},
}
PACKAGES = {"models", "hf", "training", "parallel", "run"}   # transformer_jax.<name>
# Top-level modules above the blocks: the old paths of the run layer (lazy forwards,
# see _moved.py) and the entry point.
RUN_LEVEL = {"__main__", "cli", "commands"}
OLD_PATHS = {"transformer_jax.cli", "transformer_jax.commands", "transformer_jax.training.runner",
             "transformer_jax.training.run_config", "transformer_jax.training.loading",
             "transformer_jax.training.run_files"}


def layer_of(module: str) -> str | None:
    if module in OLD_PATHS:
        return "run"   # what they forward to
    parts = module.split(".")
    if parts[0] == "experiments":
        return "experiments"
    if parts[0] != "transformer_jax":
        return None
    if len(parts) == 1:
        return "blocks"   # the package itself: its __init__ imports nothing
    if parts[1] in PACKAGES:
        return parts[1]
    return "run" if parts[1] in RUN_LEVEL else "blocks"


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, package: str) -> set[str]:
    """Every module `tree` imports; `from transformer_jax import x` yields both the
    package and `transformer_jax.x`, since x may be a submodule."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: resolve against the importing package
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def sources():
    return sorted(p for d in ("transformer_jax", "experiments") for p in (ROOT / d).rglob("*.py"))


def test_the_source_tree_is_found():
    found = {module_name(p) for p in sources()}
    assert {"transformer_jax.run.loop", "transformer_jax.models.registry",
            "transformer_jax.training.step", "experiments.ln_stability"} <= found


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_one_way(path):
    module = module_name(path)
    layer = layer_of(module)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    bad = sorted(f"{name} ({layer_of(name)})"
                 for name in imported(ast.parse(path.read_text()), package)
                 if layer_of(name) is not None and layer_of(name) not in ALLOWED[layer])
    assert not bad, f"{module} (layer {layer}) imports from layers above it: {bad}"


def test_old_paths_forward_lazily():
    # The deprecated modules import nothing at import time but the forwarding helper,
    # so importing e.g. transformer_jax.training never loads the run layer.
    for name in OLD_PATHS:
        path = ROOT / (name.replace(".", "/") + ".py")
        names = imported(ast.parse(path.read_text()), name.rpartition(".")[0])
        assert names <= {"transformer_jax._moved", "transformer_jax._moved.forward"}, (name, names)


def test_the_checker_catches_an_upward_import():
    # A test that could not fail would prove nothing: an upward import is caught.
    tree = ast.parse("def f():\n    from transformer_jax.run.loop import train\n")
    names = imported(tree, "transformer_jax.training")
    assert any(layer_of(n) not in ALLOWED["training"] for n in names if layer_of(n))
    assert layer_of("transformer_jax.parallel.strategy") not in ALLOWED["training"]
    assert layer_of("transformer_jax.training.runner") not in ALLOWED["training"]   # an old path


@pytest.mark.parametrize("old, name", [("transformer_jax.training.runner", "train"),
                                       ("transformer_jax.training.run_config", "RunConfig"),
                                       ("transformer_jax.cli", "main")])
def test_old_paths_still_work_with_a_warning(old, name):
    import importlib
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to transformer_jax.run"):
        value = getattr(module, name)
    home = {"train": "transformer_jax.run.loop", "RunConfig": "transformer_jax.run.config",
            "main": "transformer_jax.run.cli"}[name]
    assert value is getattr(importlib.import_module(home), name)
