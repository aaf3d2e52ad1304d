"""bench/studies/notebooks.py on the CPU: a notebook's code cells run in one process without Jupyter, and the plots
and figure lines of every run are gathered into the output folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.studies import notebooks

ROOT = Path(__file__).resolve().parents[3]


def test_code_cells_run_in_order_in_one_process_beside_the_notebook(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    cells = [{"cell_type": "markdown", "source": ["# not run"]},
             {"cell_type": "code", "source": ["value = 6\n"]},
             {"cell_type": "code",
              "source": ["from pathlib import Path\n", "Path('ran.txt').write_text(str(value * 7))"]}]
    (folder / "t.ipynb").write_text(json.dumps({"cells": cells}))
    code = "import sys; from pathlib import Path; from bench.studies.notebooks import run_in_process; " \
           "run_in_process(Path(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, str(folder / "t.ipynb")], cwd=tmp_path, capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (folder / "ran.txt").read_text() == "42"


def test_collect_gathers_the_plots_and_the_figure_lines(tmp_path, monkeypatch, capsys):
    runs, out = tmp_path / "runs", tmp_path / "out"
    (runs / "01").mkdir(parents=True)
    out.mkdir()
    (runs / "01" / "quickstart.png").write_bytes(b"png")
    (out / "01_quickstart.log").write_text("loading\ntokens_per_s: 1234\nChosen plan: stream\n")
    monkeypatch.setattr(notebooks, "RUNS_DIR", runs)
    notebooks.collect(out)
    printed = capsys.readouterr().out
    assert (out / "quickstart.png").read_bytes() == b"png"
    assert "tokens_per_s: 1234" in printed and "Chosen plan: stream" in printed and "loading" not in printed
