"""The notebooks run top to bottom twice in one kernel (a re-run must work), on the CPU, with short settings.

A cell that raises fails the test. The notebooks are committed without outputs, so diffs stay readable.
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


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
    notebook = nbformat.read(path, as_version=4)
    twice = nbformat.v4.new_notebook(cells=notebook.cells + [nbformat.from_dict(c) for c in notebook.cells],
                                     metadata=notebook.metadata)
    for index, cell in enumerate(twice.cells):
        cell["id"] = f"run-{index}"
    client = nbclient.NotebookClient(twice, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    assert list(tmp_path.rglob("*.png")), "the notebook saves its plots"
