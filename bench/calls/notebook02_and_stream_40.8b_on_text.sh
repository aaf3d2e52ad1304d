#!/usr/bin/env bash
# One GPU call (~7 minutes): notebook 02 again (plain-Python runner with IPython's display printed as text), the
# 40.8B streaming run on text for 20 steps (the loss must fall), then the side-stream activation offload's GPU test
# and timing. Outputs in $OUT.
set -uo pipefail
FINAL_OUT=${OUT:-/tmp/out}; mkdir -p "$FINAL_OUT"
started=$SECONDS
NOTEBOOKS=02_plan_your_run OUT=/tmp/work/notebooks bash bench/gpu_notebooks.sh 2>&1 | tail -6
cp /tmp/work/notebooks/02_plan_your_run.log /tmp/work/notebooks/plans.png "$FINAL_OUT/" 2>/dev/null
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
timeout 170 python3 bench/stream_step.py --size 40.8b --steps 20 --activation-reserve-gib 24 --no-planner-check \
  --data text > "$FINAL_OUT/stream_40.8b_text.log" 2>&1; grep -E "^RESULT|Error" "$FINAL_OUT/stream_40.8b_text.log" | tail -2
echo "stream done at $((SECONDS - started)) s"
remaining=$((430 - (SECONDS - started)))
(( remaining > 60 )) && OUT=$FINAL_OUT timeout "$remaining" bash bench/gpu_offload.sh 2>&1 | tail -12
echo "took $((SECONDS - started)) s"
