#!/usr/bin/env bash
# One GPU call (~8 minutes): the streaming plan's GPU test and its 32.8B step timing, the planner's view of the same
# model, then host_adam's GPU tests and its 3.6B R1 row beside the plain loop. Logs in $OUT.
set -uo pipefail
source bench/device_setup.sh package || exit 1
started=$SECONDS
timeout 80 python3 -m pytest -q -m gpu tests/backends/test_stream_gpu.py -p no:cacheprovider --tb=short \
  > "$OUT/stream_gpu_tests.txt" 2>&1; tail -4 "$OUT/stream_gpu_tests.txt"
timeout 60 python3 -m lightning_offload plan model=llama_32b data=random_tokens backend=stream rows=4 \
  hydra.run.dir=/tmp/plan > "$OUT/plan_32b.txt" 2>&1; tail -12 "$OUT/plan_32b.txt" | cut -c1-170
timeout 150 python3 bench/stream_step.py --size 32.8b --steps 6 --activation-reserve-gib 24 --no-planner-check \
  > "$OUT/stream_32.8b.log" 2>&1; grep -E "^RESULT|phase|Error" "$OUT/stream_32.8b.log" | tail -6 | cut -c1-1500
echo "stream part took $((SECONDS - started)) s"
timeout 80 python3 -m pytest -q -m gpu tests/backends/test_host_adam_gpu.py -p no:cacheprovider --tb=short \
  > "$OUT/host_adam_gpu_tests.txt" 2>&1; tail -4 "$OUT/host_adam_gpu_tests.txt"
timeout 150 python3 bench/run.py --results "$OUT/hostadam.jsonl" --log "$OUT/hostadam_cells.log" --sizes 3.6b \
  --methods plain,single_gpu_offload_host_adam --regimes r1 --steps 6 --warmup 2 > "$OUT/hostadam_run.txt" 2>&1
python3 - "$OUT/hostadam.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    keys = ("cell", "status", "step_s_median", "tokens_per_s", "model_tflops", "peak_gpu_device_gib",
            "peak_host_rss_gib", "plan", "predicted_step_s", "predicted_gpu_gib", "predicted_host_gib", "error")
    print({k: r[k] for k in keys if k in r})
PY
echo "took $((SECONDS - started)) s"
