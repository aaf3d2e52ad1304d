"""The notebooks end to end on the GPU machine: `run` executes one notebook, `collect` gathers the plots they drew.

    python -m bench.studies.notebooks run 01_quickstart --out $OUT      # $OUT/01_quickstart.ipynb and its output
    python -m bench.studies.notebooks collect --out $OUT                # the plots into $OUT, the figures printed

With nbclient, nbformat and ipykernel (carried in .whl/) the notebook runs in a kernel and the executed .ipynb is
written; without them its code cells run in this process (the same code; the plots are still written). Checkpoints
and logs stay under RUNS_DIR on the machine: only plots, logs and executed notebooks come back.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import types
from pathlib import Path

RUNS_DIR = Path("/tmp/notebook_runs")
# The lines of a notebook's output that carry its figures: speed, memory, the plan it chose, failures.
FIGURES = re.compile(r"tokens_per_s|model_tflops|^ *mfu|peak_gpu|peak_pinned|reloaded model|Chosen|[0-9]B \(|"
                     r"nothing fits|ERROR")


def run_in_kernel(source: Path, rendered: Path, timeout_s: int) -> None:
    import nbclient
    import nbformat

    notebook = nbformat.read(source, as_version=4)
    try:
        nbclient.NotebookClient(notebook, timeout=timeout_s, kernel_name="python3",
                                resources={"metadata": {"path": str(source.parent)}}).execute()
    finally:
        nbformat.write(notebook, rendered)
        for cell in notebook.cells:
            for output in cell.get("outputs", []):
                if output.output_type == "stream" and output.name == "stdout":
                    print(output.text, end="")
                elif output.output_type == "error":
                    print(f"ERROR {output.ename}: {output.evalue}")


def run_in_process(source: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    try:
        import IPython.display  # noqa: F401
    except ImportError:  # no Jupyter on the machine: rich output is printed as text
        display_module = types.ModuleType("IPython.display")
        display_module.Markdown, display_module.display = str, print
        ipython = types.ModuleType("IPython")
        # What libraries (matplotlib) read from IPython to learn that they are not inside a kernel.
        ipython.get_ipython, ipython.version_info, ipython.display = (lambda: None), (0, 0), display_module
        sys.modules["IPython"], sys.modules["IPython.display"] = ipython, display_module
    cells = json.loads(source.read_text())["cells"]
    os.chdir(source.parent)
    namespace = {"__name__": "__main__"}
    for index, cell in enumerate(cells):
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{source} cell {index}", "exec"), namespace)


def collect(out: Path) -> None:
    for plot in RUNS_DIR.rglob("*.png"):
        shutil.copy(plot, out)
    print("\n".join(str(plot) for plot in sorted(out.glob("*.png"))))
    lines = [line for log in sorted(out.glob("*.log")) for line in log.read_text(errors="replace").splitlines()
             if FIGURES.search(line)]
    print("\n".join(lines[-30:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["run", "collect"])
    parser.add_argument("notebook", nargs="?", help="its name in notebooks/, e.g. 01_quickstart")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--timeout-s", type=int, default=140, help="per cell, in a kernel")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.action == "collect":
        collect(args.out)
        return
    os.environ["LIGHTNING_OFFLOAD_NOTEBOOK_DIR"] = str(RUNS_DIR)
    source = (Path("notebooks") / f"{args.notebook}.ipynb").resolve()
    try:
        import ipykernel  # noqa: F401
        import nbclient  # noqa: F401
        import nbformat  # noqa: F401
    except ImportError:
        print("runner: plain Python (nbclient/ipykernel missing)", flush=True)
        run_in_process(source)
    else:
        print("runner: nbclient", flush=True)
        run_in_kernel(source, args.out / f"{args.notebook}.ipynb", args.timeout_s)


if __name__ == "__main__":
    main()
