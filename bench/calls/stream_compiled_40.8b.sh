#!/usr/bin/env bash
# One GPU call (~7 minutes): 40.8B R1 with compiled decoder layers (20 steps, issue "The streaming plan"), then R1
# at 1.5B for the benchmark methods the previous call did not reach, until the call's deadline (issue "The
# benchmark"); results in $OUT/results.jsonl.
set -uo pipefail
source bench/device_setup.sh checkout || exit 1
started=$SECONDS
timeout 190 python3 bench/stream_step.py --size 40.8b --steps 20 --activation-reserve-gib 24 --no-planner-check \
  --compile-blocks > "$OUT/stream_40.8b_compiled.log" 2>&1
grep -E "^RESULT|Error" "$OUT/stream_40.8b_compiled.log" | tail -2 | cut -c1-1200
echo "40.8b took $((SECONDS - started)) s"
python3 bench/run.py --sizes 1.5b --regimes r1 --timeout-s 120 --deadline-s $((470 - (SECONDS - started))) \
  --methods single_gpu_offload_fsdp,lightning_fsdp_cpu_offload,single_gpu_offload_deepspeed,lightning_deepspeed_stage_3_offload \
  --results "$OUT/results.jsonl" > "$OUT/run.out" 2>&1
grep -E ": (ok|fail|timeout|not|killed)" "$OUT/run.out" | cut -c1-300
echo "took $((SECONDS - started)) s"
