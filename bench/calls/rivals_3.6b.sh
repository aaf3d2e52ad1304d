#!/usr/bin/env bash
# One GPU call (~8 minutes): 3.6B R1, our `fsdp` backend beside Lightning's `FSDPStrategy(cpu_offload=True)` with a
# fused CPU AdamW (its defaults row steps torch's for-each one), and our fastest rows beside torchtune's compiled
# method and torchao's CPU offload (both modes), all in this call. Tables at the end; logs in $OUT.
set -uo pipefail
source bench/device_setup.sh checkout || exit 1
started=$SECONDS
methods=single_gpu_offload_fsdp,lightning_fsdp_cpu_offload_fused,single_gpu_offload_gpu_8bit_compiled
methods+=,torchtune_compiled,torchtune,torchao_offload_accumulating,torchao_offload,single_gpu_offload_auto
methods+=,lightning_fsdp_cpu_offload
timeout 500 python3 bench/run.py --sizes 3.6b --regimes r1 --methods "$methods" --timeout-s 200 --deadline-s 480 \
  --results "$OUT/rivals_3.6b.jsonl" --log "$OUT/rivals_3.6b_cells.log" > "$OUT/rivals_3.6b_run.txt" 2>&1
echo "cells done at $((SECONDS - started)) s"
for ours in single_gpu_offload_fsdp single_gpu_offload_gpu_8bit_compiled; do
  python3 bench/rivals_table.py "$OUT/rivals_3.6b.jsonl" --ours "$ours"
done
echo "took $((SECONDS - started)) s"
