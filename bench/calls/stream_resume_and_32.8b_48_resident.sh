#!/usr/bin/env bash
# One GPU call (~8 minutes): the streaming plan's resume exactness (bench/gpu_stream_resume.sh: GPU tests, then 1.5B
# bit-exact resume), then 32.8B R1 with 48 of 64 blocks resident - the placement the planner picks - for the host
# RSS bound (2.5 B/param + 4 GiB = 80.4 GiB). Logs in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
started=$SECONDS
bash bench/gpu_stream_resume.sh
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
timeout 140 python3 bench/stream_step.py --size 32.8b --steps 6 --resident-blocks 48 --no-planner-check \
  > "$OUT/stream_32.8b_resident48.log" 2>&1
grep -E "^RESULT|Error" "$OUT/stream_32.8b_resident48.log" | tail -2
echo "took $((SECONDS - started)) s"
