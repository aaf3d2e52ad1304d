#!/usr/bin/env bash
# One GPU call (~5 minutes): notebook 02 end to end (issue "Jupyter experimentation"), then the streaming plan's
# 300-step curve with deterministic kernels beside the same 8-bit AdamW stepped after backward (fused) and inside
# backward (gpu_8bit): identical curves mean the stream schedule adds no race on the GPU. Logs in $OUT.
set -uo pipefail
FINAL_OUT=${OUT:-/tmp/out}; mkdir -p "$FINAL_OUT"
started=$SECONDS
NOTEBOOKS=02_plan_your_run OUT=/tmp/work/notebooks bash bench/gpu_notebooks.sh 2>&1 | tail -8
cp /tmp/work/notebooks/02_plan_your_run.log /tmp/work/notebooks/*.png "$FINAL_OUT/" 2>/dev/null
echo "notebook done at $((SECONDS - started)) s"
OUT=$FINAL_OUT MODES=deterministic bash bench/gpu_streamnum.sh
echo "took $((SECONDS - started)) s"
