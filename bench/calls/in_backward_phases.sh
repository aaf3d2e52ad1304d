#!/usr/bin/env bash
# One GPU call (~6 minutes): the per-phase timing of the in-backward plans (issue
# "Optimizer inside backward": overlap shown in bench/RESULTS.md) - host_adam at 3.6B R1 with the planner's share
# and with every state on the host, host_adam at 8B R2, gpu_8bit at 8B R1 - then the 3.6B gpu_only `none` run
# again for the planner's activation estimate after storages are counted once (~49 GiB predicted, 45.5 measured
# before). Phase JSONs, Chrome traces and logs land in $OUT.
set -uo pipefail
source bench/device_setup.sh package || exit 1
started=$SECONDS
source bench/phases.sh
phases 75 hostadam_3.6b_planned --size 3.6b
phases 75 hostadam_3.6b_all_host --size 3.6b --gpu-state-blocks 0
phases 150 hostadam_8b_r2 --size 8b --accumulate 8
phases 75 gpu8bit_8b --backend gpu_8bit --size 8b
echo "phases done at $((SECONDS - started)) s"
COMBOS="strategy=gpu_8bit optimizer=adamw8bit activation_checkpointing=none" BUDGET_S=90 bash bench/levers_gpu.sh | tail -2
echo "took $((SECONDS - started)) s"
