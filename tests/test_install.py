"""The notebooks' install logic (transformer_jax/install.py) on fake runtimes.

Each test makes up a "preinstalled" runtime (a dict of versions, Colab's TPU
image by default) and a fake pip that records its command line, so nothing is
installed and no network is used. The expected pins and errors follow from the
dict the test wrote.
"""
import json
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from transformer_jax import install

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "experiments" / "notebooks").glob("*.ipynb"))
# Colab's TPU image, 2026-08 (googlecolab/backend-info, pip-freeze.tpu.txt).
COLAB_TPU = {"jax": "0.7.2", "jaxlib": "0.7.2", "flax": "0.11.2", "optax": "0.2.8",
             "orbax-checkpoint": "0.12.4", "chex": "0.1.90", "numpy": "2.0.2",
             "libtpu": "0.0.21.1", "tokenizers": "0.22.2", "matplotlib": "3.10.0",
             "tqdm": "4.67.1"}
# Requirements the image lacks, which the install cell adds (the version pip would pick).
NOT_ON_COLAB = {"sacrebleu": "2.6.0"}


class FakePip:
    """Records pip's arguments and the constraints file; 'installs' the missing."""

    def __init__(self, runtime, installs=None):
        self.runtime, self.installs, self.calls = runtime, installs or {}, []

    def __call__(self, cmd, check):
        assert check and cmd[1:4] == ["-m", "pip", "install"]
        constraints = Path(cmd[cmd.index("-c") + 1]).read_text().split()
        self.calls.append((constraints, cmd[cmd.index("-c") + 2:]))
        self.runtime.update(self.installs)


def _requirements():
    return install.project_requirements()


def test_requirements_are_pyprojects_core_dependencies():
    import tomllib
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert [str(r) for r in _requirements()] == [str(Requirement(d)) for d in declared]
    names = {r.name for r in _requirements()}
    assert {"jax", "flax", "optax", "orbax-checkpoint"} <= names


def test_colab_runtime_installs_only_the_missing_with_everything_pinned():
    runtime = {k: v for k, v in COLAB_TPU.items() if k != "tokenizers"}  # one more missing
    pip = FakePip(runtime, installs={"tokenizers": "0.22.2", **NOT_ON_COLAB})
    installed = install.install_dependencies(_requirements(), runtime.get, pip)
    declared = {r.name: r for r in _requirements()}
    assert sorted(installed) == sorted(str(declared[n]) for n in ["tokenizers", *NOT_ON_COLAB])
    [(constraints, args)] = pip.calls
    assert args == installed
    # Every preinstalled requirement and runtime package, at the version present.
    expected = {f"{n}=={v}" for n, v in COLAB_TPU.items() if n != "tokenizers"}
    assert set(constraints) == expected


def test_complete_runtime_runs_no_pip():
    pip = FakePip(dict(COLAB_TPU, **NOT_ON_COLAB))
    assert install.install_dependencies(_requirements(), pip.runtime.get, pip) == []
    assert pip.calls == []


@pytest.mark.parametrize("package, version", [
    ("jax", "0.7.1"),     # below the range: Flax 0.11.2 and Orbax 0.12.4 need more
    ("jax", "0.13.0"),    # above it
    ("flax", "0.10.7"),
])
def test_out_of_range_runtime_stops_before_installing(package, version):
    runtime = dict(COLAB_TPU, **{package: version})
    pip = FakePip(runtime)
    with pytest.raises(RuntimeError, match=rf"preinstalled {package} {version} "
                                           rf"\(transformer_jax needs {package}.*Nothing was installed"):
        install.install_dependencies(_requirements(), runtime.get, pip)
    assert pip.calls == []


def test_pip_changing_a_pinned_package_is_an_error():
    runtime = {k: v for k, v in COLAB_TPU.items() if k != "tokenizers"}
    pip = FakePip(runtime, installs={"tokenizers": "0.22.2", "jax": "0.10.2"})
    with pytest.raises(RuntimeError, match="changed preinstalled.*jax"):
        install.install_dependencies(_requirements(), runtime.get, pip)


def _install_cell(path):
    cells = json.loads(path.read_text())["cells"]
    [cell] = [c for c in cells if c["cell_type"] == "code" and "REPO_URL" in "".join(c["source"])]
    return "".join(cell["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_install_cell_keeps_or_refuses_the_runtime(path, monkeypatch, capsys):
    """The cell itself, run where transformer_jax is importable, on fake runtimes."""
    code = _install_cell(path)
    runtime = {k: v for k, v in COLAB_TPU.items() if k != "tokenizers"}
    pip = FakePip(runtime, installs={"tokenizers": "0.22.2", **NOT_ON_COLAB})
    monkeypatch.setattr(install, "installed_version", runtime.get)
    monkeypatch.setattr(subprocess, "run", pip)
    exec(compile(code, str(path), "exec"), {})
    [(constraints, args)] = pip.calls
    assert "jax==0.7.2" in constraints and "libtpu==0.0.21.1" in constraints
    assert sorted(Requirement(a).name for a in args) == sorted(["tokenizers", *NOT_ON_COLAB])
    assert "restart" not in capsys.readouterr().out.lower()

    runtime["jax"] = "0.6.2"
    with pytest.raises(RuntimeError, match="preinstalled jax 0.6.2"):
        exec(compile(code, str(path), "exec"), {})
    assert len(pip.calls) == 1


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_install_cell_asks_for_the_repo_url(path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformer_jax" else real(name, *a))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip was run"))
    with pytest.raises(RuntimeError, match="set REPO_URL"):
        exec(compile(_install_cell(path), str(path), "exec"), {})
