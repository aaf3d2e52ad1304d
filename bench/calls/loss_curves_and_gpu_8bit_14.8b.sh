#!/usr/bin/env bash
# One GPU call (~9 minutes): 300-step loss curves of the in-backward plans against fp32 AdamW on the GPU, then
# gpu_8bit beside torchtune's method at 8B and 14.8B (R1) with the planner's prediction recorded per cell, then the
# 1.5B `device` plan's host memory while time remains. Logs in $OUT; a table is printed last.
set -uo pipefail
source bench/device_setup.sh checkout || exit 1
started=$SECONDS
deadline=${DEADLINE_S:-560}
timeout 190 python3 bench/optim_convergence.py --runs reference gpu_8bit stream host_adam --seeds 1234 1 \
  > "$OUT/convergence_gpu.txt" 2>&1; grep "^|" "$OUT/convergence_gpu.txt"
echo "convergence done at $((SECONDS - started)) s"
timeout $((deadline - 60 - (SECONDS - started))) python3 bench/run.py --sizes 8b,14.8b --regimes r1 \
  --methods torchtune,single_gpu_offload_gpu_8bit --steps 6 --warmup 2 --timeout-s 140 \
  --deadline-s $((deadline - 70 - (SECONDS - started))) \
  --results "$OUT/gpu8bit.jsonl" --log "$OUT/gpu8bit_cells.log" > "$OUT/gpu8bit_run.txt" 2>&1
echo "gpu_8bit cells done at $((SECONDS - started)) s"
if (( SECONDS - started < deadline - 55 )); then
  timeout 55 python3 bench/run.py --sizes 1.5b --regimes r1 --methods single_gpu_offload_device --steps 5 --warmup 2 \
    --timeout-s 50 --results "$OUT/gpu8bit.jsonl" --log "$OUT/gpu8bit_cells.log" >> "$OUT/gpu8bit_run.txt" 2>&1
fi
python3 - "$OUT/gpu8bit.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    keys = ("cell", "status", "cause", "step_s_median", "tokens_per_s", "model_tflops", "peak_gpu_torch_gib",
            "peak_gpu_device_gib", "peak_host_rss_gib", "loss_first", "loss_last", "plan", "predicted_step_s",
            "predicted_gpu_gib", "predicted_host_gib", "error")
    print({k: r[k] for k in keys if k in r})
PY
echo "took $((SECONDS - started)) s"
