#!/usr/bin/env bash
# On the GPU machine (~2 minutes): the offload checkpointing GPU test, then forward + backward of a 1B-shaped Llama
# stack (hidden 2048, 16 layers, micro-batch 4 x 2048) under none / full / offload / torch's save_on_cpu.
set -uo pipefail
source bench/device_setup.sh checkout || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 120 python3 -m pytest -q -m gpu tests/test_offload_activations_gpu.py -p no:cacheprovider --tb=short \
  > "$OUT/offload_gpu_tests.txt" 2>&1; tail -3 "$OUT/offload_gpu_tests.txt"
timeout 150 python3 bench/offload_checkpointing.py > "$OUT/offload_checkpointing.log" 2>&1 || true
grep -E "Error|error" "$OUT/offload_checkpointing.log" | tail -3
sed -n '/^Llama stack/,$p' "$OUT/offload_checkpointing.log"
