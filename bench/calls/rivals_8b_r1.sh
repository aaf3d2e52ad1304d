#!/usr/bin/env bash
# One GPU call (~9 minutes): 8B R1, our rows beside torchtune's method (eager with the full logits, compiled with its
# linear cross-entropy, and last, if time remains, its config as shipped) and torchao's CPU offload (both modes), all
# in this call; then the output layer's loss alone each way (ours, Liger-Kernel's, torchtune's), time and peak.
# Tables of tokens/s and ratios at the end; logs in $OUT.
# Lightning's FSDP and DeepSpeed presets are not here: at 8B each runs out of the host's 125 GiB (their fp32 state),
# measured with the defaults, and the tuned rows keep the same state.
set -uo pipefail
source bench/device_setup.sh checkout || exit 1
started=$SECONDS
# In priority order: run.py stops starting cells at the deadline.
methods=single_gpu_offload_gpu_8bit_compiled,torchtune_compiled,torchtune,single_gpu_offload_gpu_8bit
methods+=,single_gpu_offload_gpu_8bit_compiled_liger,single_gpu_offload_auto,torchao_offload
methods+=,torchao_offload_accumulating,single_gpu_offload_host_adam,torchtune_linear
timeout 450 python3 bench/run.py --sizes 8b --regimes r1 --methods "$methods" --timeout-s 180 --deadline-s 430 \
  --results "$OUT/rivals_8b_r1.jsonl" --log "$OUT/rivals_8b_r1_cells.log" > "$OUT/rivals_8b_r1_run.txt" 2>&1
echo "cells done at $((SECONDS - started)) s"
if (( SECONDS - started < 470 )); then
  timeout 60 python3 bench/rival_losses.py --sizes 8b > "$OUT/rival_losses_8b.txt" 2>&1
  grep RESULT "$OUT/rival_losses_8b.txt" || tail -3 "$OUT/rival_losses_8b.txt"
fi
# Compiled against compiled, eager against eager, and the exact-AdamW rows against torchao's.
for ours in single_gpu_offload_gpu_8bit_compiled single_gpu_offload_gpu_8bit single_gpu_offload_host_adam; do
  python3 bench/rivals_table.py "$OUT/rivals_8b_r1.jsonl" --ours "$ours"
done
echo "took $((SECONDS - started)) s"
