#!/usr/bin/env bash
# One GPU call (~8 minutes), issue "The streaming plan", measured/limit: 32.8B R1 (48 of 64 blocks resident, the
# planner's placement) with compiled decoder layers and then eager ones, side by side; 19B compiled (every block
# resident); the GPU tests of `compile_blocks`; the probe's per-size GEMM rates (the limit's compute term).
set -uo pipefail
source bench/device_setup.sh checkout || exit 1
started=$SECONDS
step() {  # limit, name, then stream_step.py arguments
  local limit=$1 name=$2; shift 2
  timeout "$limit" python3 bench/stream_step.py "$@" > "$OUT/stream_$name.log" 2>&1
  grep -E "^RESULT|Error" "$OUT/stream_$name.log" | tail -2 | cut -c1-900
  echo "$name took $((SECONDS - started)) s in all"
}
step 170 32.8b_compiled --size 32.8b --steps 7 --resident-blocks 48 --no-planner-check --compile-blocks
step 140 32.8b_eager --size 32.8b --steps 6 --resident-blocks 48 --no-planner-check
step 120 19b_compiled --size 19b --steps 7 --activation-reserve-gib 24 --no-planner-check --compile-blocks
timeout 70 python3 -m pytest -q -p no:cacheprovider tests/test_compile_gpu.py 2>&1 | tail -3
timeout 50 python3 -c "from bench.probe import model_matmuls; print('RESULT', model_matmuls())"
echo "took $((SECONDS - started)) s"
