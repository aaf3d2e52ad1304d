#!/usr/bin/env bash
# One GPU call (~8 minutes): 8B R2 (65,536 tokens per step), our rows beside the rivals' accumulating modes in this
# call: torchtune's method with its optimizer stepped after the micro-batches (compiled, linear cross-entropy) and
# torchao's CPU offload with gradients accumulated on the GPU; then the rival losses' GPU tests while time remains.
# Tables of tokens/s and ratios at the end; logs in $OUT.
set -uo pipefail
source bench/device_setup.sh checkout || exit 1
started=$SECONDS
methods=single_gpu_offload_gpu_8bit_compiled,torchtune_accumulating,torchao_offload_accumulating
methods+=,single_gpu_offload_host_adam,single_gpu_offload_auto
timeout 500 python3 bench/run.py --sizes 8b --regimes r2 --methods "$methods" --timeout-s 200 --deadline-s 480 \
  --results "$OUT/rivals_8b_r2.jsonl" --log "$OUT/rivals_8b_r2_cells.log" > "$OUT/rivals_8b_r2_run.txt" 2>&1
echo "cells done at $((SECONDS - started)) s"
if (( SECONDS - started < 420 )); then  # the rival losses against ours, value and gradients
  timeout 75 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=line tests/bench/test_rival_losses_gpu.py \
    > "$OUT/rival_losses_tests.txt" 2>&1; tail -4 "$OUT/rival_losses_tests.txt"
fi
for ours in single_gpu_offload_gpu_8bit_compiled single_gpu_offload_host_adam; do
  python3 bench/rivals_table.py "$OUT/rivals_8b_r2.jsonl" --ours "$ours"
done
echo "took $((SECONDS - started)) s"
