#!/usr/bin/env bash
# One GPU call (~7 minutes): gpu_8bit beside torchtune's method at 8B (R1), recording the planner's prediction
# for the plan that ran, then the gpu_8bit and streaming-plan GPU tests while time remains. Logs in $OUT.
set -uo pipefail
source bench/device_setup.sh checkout || exit 1
started=$SECONDS
deadline=${DEADLINE_S:-420}
timeout 250 python3 bench/run.py --sizes 8b --regimes r1 --methods torchtune,single_gpu_offload_gpu_8bit \
  --steps 6 --warmup 2 --timeout-s 120 --results "$OUT/gpu8bit.jsonl" --log "$OUT/gpu8bit_cells.log" \
  > "$OUT/gpu8bit_run.txt" 2>&1
echo "benchmark done at $((SECONDS - started)) s"
if (( SECONDS - started < deadline - 90 )); then
  timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=line tests/backends/test_gpu_8bit_cuda.py \
    > "$OUT/gpu8bit_tests.txt" 2>&1; tail -4 "$OUT/gpu8bit_tests.txt"
fi
if (( SECONDS - started < deadline - 50 )); then
  timeout 50 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=line tests/backends/test_stream_gpu.py \
    tests/backends/test_host_adam_gpu.py::test_gpu_run_matches_a_plain_fp32_run_on_the_gpu \
    > "$OUT/stream_tests.txt" 2>&1; tail -4 "$OUT/stream_tests.txt"
fi
python3 - "$OUT/gpu8bit.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    keys = ("cell", "status", "cause", "step_s_median", "step_s_mean", "tokens_per_s", "model_tflops",
            "peak_gpu_torch_gib", "peak_gpu_device_gib", "peak_host_rss_gib", "loss_first", "loss_last", "plan",
            "predicted_step_s", "predicted_gpu_gib", "predicted_host_gib", "error")
    print({k: r[k] for k in keys if k in r})
PY
echo "took $((SECONDS - started)) s"
