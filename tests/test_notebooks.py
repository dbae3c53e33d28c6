"""The Colab notebooks in experiments/notebooks run top to bottom in a real Jupyter kernel.

Each notebook is executed as a papermill job would run it: a cell that sets tiny
sizes is inserted after the cell tagged `parameters`, and nbclient runs every
cell in a `python3` (ipykernel) kernel on the CPU (JAX_PLATFORMS=cpu), in a
temporary directory, with the repository on PYTHONPATH. A cell error fails the
test; then the outputs each notebook exists to show are checked: plots and
verdicts, a checkpoint round trip and an accuracy, generated text and the
attention comparison.
"""
import base64
import os
import re
from pathlib import Path

import pytest
from xla_flags import child_xla_flags

# The `notebooks` extra; without it (pip install -e ".[test]" alone) the module skips.
nbformat = pytest.importorskip("nbformat")
NotebookClient = pytest.importorskip("nbclient").NotebookClient
pytest.importorskip("ipykernel")

pytestmark = pytest.mark.slow   # executes the Colab notebooks end to end: deselect with -m 'not slow'

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "experiments" / "notebooks"
NAMES = ("ln_stability_colab.ipynb", "bert_pretraining_colab.ipynb", "gpt_colab.ipynb")
CELL_TIMEOUT_S = 300


def execute(name: str, overrides: str, cwd: Path):
    """The executed notebook, with `overrides` run right after the parameters cell; the
    kernel compiles with FAST_COMPILE (tests/xla_flags.py): at the tiny sizes every
    notebook is compile-bound."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: expected one cell tagged 'parameters', found {len(tagged)}"
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(
        overrides, metadata={"tags": ["injected-parameters"]}))
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}
    env["XLA_FLAGS"] = child_xla_flags()
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}})
    client.execute(env=env)   # raises CellExecutionError, naming the cell, on any error
    return nb


def _outputs(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def text_of(nb) -> str:
    """Everything printed (streams) and every text/plain result, in order."""
    parts = []
    for o in _outputs(nb):
        if o["output_type"] == "stream":
            parts.append(o["text"])
        elif "text/plain" in o.get("data", {}):
            parts.append(o["data"]["text/plain"])
    return "\n".join(parts)


def markdown_of(nb) -> str:
    return "\n".join(o["data"]["text/markdown"] for o in _outputs(nb)
                     if "text/markdown" in o.get("data", {}))


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"no line matching {pattern!r} in the output:\n{text[-3000:]}"
    return float(match.group(1))


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_clean(name):
    """Committed without outputs, a markdown cell first, one parameters cell."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.cells[0].cell_type == "markdown"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), \
        f"{name} has outputs; clear them before committing"
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and 'SIZE = "auto"' in params[0].source


def test_ln_stability_notebook(tmp_path):
    # Seven small programs compiled, each run for a few steps: compilation dominates.
    nb = execute("ln_stability_colab.ipynb", 'SIZE = "tiny"\nOUT = "ln_results"', tmp_path)
    text, md = text_of(nb), markdown_of(nb)
    assert "backend: cpu" in text and "spread over 1 local device(s)" in text
    images = [o["data"]["image/png"] for o in _outputs(nb) if "image/png" in o.get("data", {})]
    # gradnorm_layers, gradnorm_depth, loss_lm, heatmap_lm: real PNGs shown inline
    assert len(images) == 4
    assert all(base64.b64decode(image)[:8] == b"\x89PNG\r\n\x1a\n" for image in images)
    assert "| claim | verdict |" in md
    for claim in ("1a.", "1b.", "2a.", "2b.", "3."):
        assert f"| {claim} " in md
    verdicts = re.findall(r"\| \*\*(supported|refuted|inconclusive)\*\* \|", md)
    assert len(verdicts) == 5
    assert "| post | 0 |" in md and "| pre | 10 |" in md         # the sweep table
    assert "(tolerance 0.0001): passed" in md                  # vmapped run == one by one
    out = tmp_path / "ln_results" / "tiny"
    assert (out / "report.md").is_file() and (out / "heatmap_lm.png").stat().st_size > 10_000


def test_bert_notebook(tmp_path):
    nb = execute("bert_pretraining_colab.ipynb", 'SIZE = "tiny"', tmp_path)
    text = text_of(nb)
    assert "backend: cpu" in text
    before = _number(r"validation loss ([0-9.]+) -> ", text)
    after = _number(r"validation loss [0-9.]+ -> ([0-9.]+)", text)
    assert after < before - 0.3, "pre-training did not lower the validation loss"
    arrays = _number(r"checkpoint round trip: restored params equal the saved ones \((\d+) arrays",
                     text)
    assert arrays > 20
    accuracy = _number(r"fine-tuned accuracy ([0-9.]+) vs majority baseline", text)
    baseline = _number(r"vs majority baseline ([0-9.]+)", text)
    # The baseline is the test set's majority class; the classifier must beat it.
    assert 0.5 <= baseline < 0.95 and accuracy > baseline


def test_gpt_notebook(tmp_path):
    # 60 of the tiny size's 200 steps: what is checked is generation, the cache and the
    # attention comparison, none of which needs a well-trained model.
    nb = execute("gpt_colab.ipynb", 'SIZE = "tiny"\nSTEPS = 60\nPROMPT = "Return the"', tmp_path)
    text, md = text_of(nb), markdown_of(nb)
    assert "backend: cpu" in text
    sampled = re.search(r"generated \(temperature 0\.8, top-k 40\): (.+)", text)
    assert sampled and sampled.group(1)[1:].startswith("Return the") and \
        len(sampled.group(1)) > len("'Return the'") + 20
    assert "generated (greedy): " in text
    assert "cached greedy decoding equals the uncached forward pass: True" in text
    assert _number(r"max \|logit difference\| chunked vs xla: ([0-9.e+-]+)", text) < 1e-4
    # local attention is a different function of the same parameters
    assert _number(r"max \|logit difference\| local vs xla: ([0-9.e+-]+)", text) > 0.1
    xla = _number(r"validation loss: xla ([0-9.]+)", text)
    chunked = _number(r"chunked ([0-9.]+), local", text)
    assert abs(chunked - xla) < 1e-4 and re.search(r"local \(window \d+\) [0-9.]+", text)
    assert "| kind | attention config | validation loss | max abs logit diff vs xla |" in md
