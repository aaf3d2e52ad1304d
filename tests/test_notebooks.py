"""The notebooks run top to bottom twice in one kernel (a re-run must work), on the CPU, with short settings.

A cell that raises fails the test. The notebooks are committed without outputs, so diffs stay readable.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_every_notebook_is_found() -> None:
    assert [path.name for path in NOTEBOOKS] == [
        "01_quickstart.ipynb", "02_plan_your_run.ipynb", "03_sweep.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_is_committed_without_outputs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_twice_in_one_kernel(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTNING_OFFLOAD_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("LIGHTNING_OFFLOAD_NOTEBOOK_DIR", str(tmp_path))
    # The kernel imports this checkout, whatever else is installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(path, as_version=4)
    cells = [copy.deepcopy(cell) for cell in notebook.cells * 2]
    for index, cell in enumerate(cells):
        cell["id"] = f"run-{index}"
    twice = nbformat.v4.new_notebook(cells=cells, metadata=notebook.metadata)
    client = nbclient.NotebookClient(twice, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    assert list(tmp_path.rglob("*.png")), "the notebook saves its plots"
