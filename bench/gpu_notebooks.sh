#!/usr/bin/env bash
# On the GPU machine: notebooks 01 (quickstart) and 02 (planner) end to end, about 3 minutes. Writes to $OUT the
# executed notebooks, their logs and the rendered plots (quickstart.png is the one docs/telemetry.md shows).
# Wheels for what the machine lacks are in .whl/ (as for bench/gpu_issue2.sh), plus nbclient, nbformat and
# ipykernel with their dependencies; without them each notebook's code cells run in one plain Python process
# instead (the same code, the plots are still written, only the executed .ipynb is missing).
set -uo pipefail
source bench/device_setup.sh package || exit 1
# Checkpoints and logs stay on the machine; only plots, logs and executed notebooks come back.
export LIGHTNING_OFFLOAD_NOTEBOOK_DIR=/tmp/notebook_runs; rm -rf "$LIGHTNING_OFFLOAD_NOTEBOOK_DIR"
NOTEBOOKS=${NOTEBOOKS:-01_quickstart 02_plan_your_run}
# Build DeepSpeed's CPU Adam before 01 (its plan may use it), with no time limit (a killed build leaves a lock).
[[ $NOTEBOOKS == *01_quickstart* ]] && python3 -c "import torch; from deepspeed.ops.adam import DeepSpeedCPUAdam; DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(1))])" 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import nbclient, nbformat, ipykernel" 2>/dev/null && echo "runner: nbclient" || echo "runner: plain Python (nbclient/ipykernel missing)"

for notebook in $NOTEBOOKS; do
  ( time timeout 150 python3 - "notebooks/$notebook.ipynb" "$OUT/$notebook.ipynb" <<'EOF'
import json
import os
import sys

source, rendered = sys.argv[1], sys.argv[2]
try:
    import nbclient
    import nbformat
except ImportError:
    nbclient = None
if nbclient is not None:
    notebook = nbformat.read(source, as_version=4)
    try:
        nbclient.NotebookClient(notebook, timeout=140, kernel_name="python3",
                                resources={"metadata": {"path": os.path.dirname(source)}}).execute()
    finally:
        nbformat.write(notebook, rendered)
        for cell in notebook.cells:
            for output in cell.get("outputs", []):
                if output.output_type == "stream" and output.name == "stdout":
                    print(output.text, end="")
                elif output.output_type == "error":
                    print(f"ERROR {output.ename}: {output.evalue}")
else:
    import types

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
    cells = json.load(open(source))["cells"]
    os.chdir(os.path.dirname(source))
    namespace = {"__name__": "__main__"}
    for index, cell in enumerate(cells):
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{source} cell {index}", "exec"), namespace)
EOF
  ) > "$OUT/$notebook.log" 2>&1
  echo "$notebook: exit $? $(grep -E '^real' "$OUT/$notebook.log")"
done
find "$LIGHTNING_OFFLOAD_NOTEBOOK_DIR" -name "*.png" -exec cp {} "$OUT/" \; || true
ls "$OUT"/*.png 2>/dev/null
grep -hE "tokens_per_s|model_tflops|^ *mfu|peak_gpu|peak_pinned|reloaded model|Chosen|[0-9]B \(|nothing fits|ERROR" \
  "$OUT"/*.log | tail -30
