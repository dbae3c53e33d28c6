"""Install transformer_jax's dependencies into a runtime without touching its JAX.

Colab (and other managed images) preinstall jax, jaxlib, Flax, Optax, Orbax and
the accelerator plugin (libtpu, jax-cuda12-plugin) as a matched set. A plain
``pip install`` of a project that asks for newer versions replaces them: the new
jaxlib no longer matches the plugin, and the kernel needs a restart. So the
notebooks' install cell first installs the package alone (``--no-deps``), then
runs this module (stdlib and ``packaging`` only, no JAX import), which

1. reads the project's requirements (its installed metadata, or the checkout's
   ``pyproject.toml``);
2. fails with a clear message if a preinstalled package (jax above all) lies
   outside the supported range, before anything is installed;
3. installs only the missing requirements, with every preinstalled requirement
   and runtime package pinned by a pip constraints file to the version present,
   so nothing already imported can change and no restart is ever needed.

    python -m transformer_jax.install            # what the notebooks' cell runs
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Callable, Iterable, Mapping

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

DIST = "transformer-jax"
# Part of the runtime although not our requirements: the accelerator plugins must
# keep matching jaxlib, so they are pinned too whenever they are present.
RUNTIME_PACKAGES = ("jax", "jaxlib", "libtpu", "jax-cuda12-plugin", "jax-cuda12-pjrt",
                    "jax-cuda13-plugin", "jax-cuda13-pjrt", "flax", "optax",
                    "orbax-checkpoint", "chex", "numpy")

VersionOf = Callable[[str], "str | None"]


def installed_version(name: str) -> str | None:
    """The installed version of distribution ``name``, None when absent."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def project_requirements() -> list[Requirement]:
    """The core requirements (no extras) that apply to this interpreter.

    A checkout's own ``pyproject.toml`` wins over installed metadata, which may
    be older than the code being run.
    """
    lines = _checkout_requirements(Path(__file__).resolve().parents[1] / "pyproject.toml")
    if lines is None:
        lines = importlib.metadata.requires(DIST) or []
    reqs = [Requirement(line) for line in lines]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def _checkout_requirements(pyproject: Path) -> list[str] | None:
    if not pyproject.is_file():
        return None
    with pyproject.open("rb") as f:
        project = tomllib.load(f).get("project", {})
    return project["dependencies"] if project.get("name") == DIST else None


def plan(requirements: Iterable[Requirement], version_of: VersionOf | None = None
         ) -> tuple[list[Requirement], dict[str, str]]:
    """(requirements to install, {name: version} to pin) for this runtime.

    Raises RuntimeError naming every preinstalled package outside its range.
    """
    version_of = version_of or installed_version
    missing, pins, wrong = [], {}, []
    for req in requirements:
        have = version_of(req.name)
        if have is None:
            missing.append(req)
        elif req.specifier.contains(have, prereleases=True):
            pins[canonicalize_name(req.name)] = have
        else:
            wrong.append(f"{req.name} {have} (transformer_jax needs {req.name}{req.specifier})")
    if wrong:
        raise RuntimeError(
            "this runtime's preinstalled " + "; ".join(wrong) + " is outside the range "
            "transformer_jax supports. Nothing was installed: upgrading these here would "
            "break the match between jaxlib and the runtime's accelerator plugin (libtpu, "
            "CUDA) and need a restart. Use a runtime within the range (Colab's image, "
            "jax 0.7.2, is), or install a supported JAX for your accelerator yourself, "
            "e.g. pip install -U 'jax[tpu]>=0.7.2,<0.13', restart, then run this again.")
    for name in RUNTIME_PACKAGES:
        have = version_of(name)
        if have is not None:
            pins.setdefault(canonicalize_name(name), have)
    return missing, pins


def install_dependencies(requirements: Iterable[Requirement] | None = None,
                         version_of: VersionOf | None = None,
                         run: Callable[..., object] | None = None) -> list[str]:
    """Install the missing requirements with the preinstalled versions pinned.

    Returns the requirement strings given to pip (empty: nothing to install,
    and pip is not run, so a complete environment needs no network).
    ``version_of`` and ``run`` default to the real metadata and subprocess.run.
    """
    version_of = version_of or installed_version
    run = run or subprocess.run
    reqs = project_requirements() if requirements is None else list(requirements)
    missing, pins = plan(reqs, version_of)
    if not missing:
        return []
    args = [str(r) for r in missing]
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "runtime-constraints.txt"
        constraints.write_text("".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
        run([sys.executable, "-m", "pip", "install", "-q", "-c", str(constraints), *args],
            check=True)
    changed = {n: (v, version_of(n)) for n, v in pins.items() if version_of(n) != v}
    if changed:
        raise RuntimeError(f"pip changed preinstalled packages despite the constraints: {changed}")
    return args


def describe(version_of: VersionOf | None = None,
             names: Iterable[str] = RUNTIME_PACKAGES) -> Mapping[str, str]:
    """{name: version} of the runtime packages present, for the cell's printout."""
    version_of = version_of or installed_version
    return {n: v for n in names if (v := version_of(n)) is not None}


def main() -> int:
    try:
        installed = install_dependencies()
    except RuntimeError as e:
        print(f"transformer_jax.install: {e}", file=sys.stderr)
        return 1
    print("installed:", ", ".join(installed) or "nothing (all requirements present)")
    print("kept:", ", ".join(f"{n} {v}" for n, v in describe().items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
