"""docs/tutorial.ipynb runs top to bottom in a fresh Jupyter kernel that imports this checkout, so
the tutorial can never go stale. Its outputs are not committed; this test is what executes it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the tutorial test needs nbformat (pip install nbformat)")
nbclient = pytest.importorskip("nbclient", reason="the tutorial test needs nbclient (pip install nbclient)")
pytest.importorskip("ipykernel", reason="the tutorial test needs ipykernel (pip install ipykernel)")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "tutorial.ipynb"


def test_the_notebook_is_committed_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)


@pytest.mark.timeout(600)
def test_the_tutorial_runs_top_to_bottom(tmp_path, monkeypatch):
    # the kernel is a child process: it inherits this environment, so it imports this checkout
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "src"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # a failing cell raises CellExecutionError with its traceback
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.outputs)
    assert "largest gradient difference" in text and "loss before the step" in text
    assert "--- step 300" in text  # the sample of the last evaluation, read from metrics.jsonl
    assert (tmp_path / "tutorial-files" / "run" / "metrics.jsonl").exists()
    assert os.environ["PYTHONPATH"] == str(ROOT / "src")
