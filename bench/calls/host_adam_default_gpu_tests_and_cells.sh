#!/usr/bin/env bash
# One GPU call (<= 9.5 minutes), the first after host_adam's default became `cast_on_device=True`: host_adam's GPU
# tests (every one now runs the GPU cast), then the matrix cells that change made out of date, as many as the rest
# of the call holds (the harness plans them by their measured times; call it again for the rest).
set -uo pipefail
started=$SECONDS
TESTS=tests/backends/test_host_adam_gpu.py DEADLINE_S=150 bash bench/gpu_tests.sh
cp "$OUT/gpu_tests.log" "$OUT/gpu_tests_host_adam.log"
source bench/device_setup.sh package || exit 1
python3 bench/run.py --sizes 1.5b,3.6b,8b,14.8b \
  --methods single_gpu_offload_host_adam,single_gpu_offload_host_adam_cast_on_host,single_gpu_offload_auto \
  --results "$OUT/results.jsonl" --unmeasured bench/results.jsonl --skip-known-failures bench/results.jsonl \
  --deadline-s $((560 - (SECONDS - started))) 2>&1 | tail -20
echo "took $((SECONDS - started)) s"
