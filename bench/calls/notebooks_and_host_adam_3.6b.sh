#!/usr/bin/env bash
# One GPU call (<= 9.5 minutes): notebooks 01 and 02 end to end (bench/gpu_notebooks.sh), the 1.5B `device` cell's
# host memory now that a fit leaves the model where it trained, then host_adam's GPU tests and 3.6B R1 beside the
# plain loop: the planner's share of state on the GPU, and everything on the host. Plots come back as they are,
# logs in one archive; a table is printed last.
set -uo pipefail
FINAL_OUT=${OUT:-/tmp/out}; mkdir -p "$FINAL_OUT"
started=$SECONDS
OUT=/tmp/work/notebooks bash bench/gpu_notebooks.sh 2>&1 | tail -14
cp /tmp/work/notebooks/*.png "$FINAL_OUT/" 2>/dev/null
echo "notebooks done at $((SECONDS - started)) s"
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
LOGS=/tmp/work/logs; mkdir -p "$LOGS"; RESULTS="$LOGS/cells.jsonl"
python3 bench/run.py --sizes 1.5b --regimes r1 --methods single_gpu_offload_device --steps 5 --warmup 2 \
  --timeout-s 60 --results "$RESULTS" --log "$LOGS/cells.log" > "$LOGS/run_device.txt" 2>&1
timeout 55 python3 -m pytest -q -m gpu tests/backends/test_host_adam_gpu.py -p no:cacheprovider --tb=short \
  > "$LOGS/gpu_tests_host_adam.txt" 2>&1; tail -2 "$LOGS/gpu_tests_host_adam.txt"
remaining=$((560 - (SECONDS - started)))
if (( remaining > 70 )); then
  timeout "$remaining" python3 bench/run.py --sizes 3.6b --regimes r1 --steps 4 --warmup 1 --timeout-s 65 \
    --methods plain,single_gpu_offload_host_adam,single_gpu_offload_host_adam_all_host \
    --results "$RESULTS" --log "$LOGS/cells.log" > "$LOGS/run_hostadam.txt" 2>&1
fi
cp -r /tmp/work/notebooks "$LOGS/" 2>/dev/null
tar czf "$FINAL_OUT/logs.tgz" -C /tmp/work logs
python3 - "$RESULTS" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    keys = ("cell", "status", "cause", "step_s_median", "tokens_per_s", "model_tflops", "peak_gpu_device_gib",
            "peak_host_rss_gib", "loss_first", "loss_last", "plan", "predicted_step_s", "predicted_gpu_gib",
            "predicted_host_gib", "error")
    print({k: r[k] for k in keys if k in r})
PY
echo "took $((SECONDS - started)) s"
