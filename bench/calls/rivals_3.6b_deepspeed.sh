#!/usr/bin/env bash
# One GPU call (~9 minutes): 3.6B R1, our `deepspeed` backend beside DeepSpeed driven directly (ZeRO-2 offload) and
# Lightning's DeepSpeed presets with pinned memory and non-reentrant checkpointing (ZeRO-2 and ZeRO-3), all in this
# call. DeepSpeed's CPU Adam is built first, outside the cells' time limits: a build killed mid-way leaves a lock
# that hangs later ones. Tables at the end; logs in $OUT.
set -uo pipefail
source bench/device_setup.sh checkout || exit 1
started=$SECONDS
timeout 300 python3 -c \
  "from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('CPUAdamBuilder').load()" \
  > "$OUT/cpu_adam_build.txt" 2>&1
echo "CPU Adam built at $((SECONDS - started)) s"
methods=single_gpu_offload_deepspeed,lightning_deepspeed_stage_2_offload_tuned,deepspeed_zero2_offload
methods+=,lightning_deepspeed_stage_3_offload_tuned
left=$(( 500 - (SECONDS - started) ))
timeout "$left" python3 bench/run.py --sizes 3.6b --regimes r1 --methods "$methods" --timeout-s 180 \
  --deadline-s $(( left - 20 )) --results "$OUT/rivals_3.6b_deepspeed.jsonl" \
  --log "$OUT/rivals_3.6b_deepspeed_cells.log" > "$OUT/rivals_3.6b_deepspeed_run.txt" 2>&1
echo "cells done at $((SECONDS - started)) s"
python3 bench/rivals_table.py "$OUT/rivals_3.6b_deepspeed.jsonl" --ours single_gpu_offload_deepspeed
echo "took $((SECONDS - started)) s"
