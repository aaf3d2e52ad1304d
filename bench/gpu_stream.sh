#!/usr/bin/env bash
# On the GPU machine (~9 minutes): the streaming plan's GPU tests, then a per-phase step timing at 19B, 32.8B and
# 40.8B (R1: micro-batch 4 x 2048). transformers' loss materialises fp32 logits (152K vocabulary), hence the reserve.
# Notes: the disk is 64 GiB (no checkpoints are written here); pinning registers ~80 GiB at 32.8B and ~105 GiB at
# 40.8B at ~6 GiB/s after zeroing it (~30-40 s of setup per cell before the first step).
set -uo pipefail
source bench/device_setup.sh checkout || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
CUBLAS_WORKSPACE_CONFIG=:4096:8 timeout 120 python3 -m pytest -q -m gpu tests/backends/test_stream_gpu.py -p no:cacheprovider --tb=short \
  > "$OUT/stream_gpu_tests.txt" 2>&1; tail -3 "$OUT/stream_gpu_tests.txt"
# Budgets: 19B 100 s, 32.8B 130 s (6 steps), 40.8B 190 s (20 steps for the falling-loss acceptance).
for cell in 19b:6:100 32.8b:6:130 40.8b:20:190; do
  IFS=: read -r size steps limit <<< "$cell"
  timeout "$limit" python3 bench/stream_step.py --size "$size" --steps "$steps" --activation-reserve-gib 24 --no-planner-check \
    > "$OUT/stream_$size.log" 2>&1 || true
  grep -E "^RESULT|Error" "$OUT/stream_$size.log" | tail -2
done
# Harness rows beside the probe (another ~3 min per size, not in the budget above):
#   python3 bench/run.py --probe --sizes 32.8b --methods single_gpu_offload_stream --regimes r1
