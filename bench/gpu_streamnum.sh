#!/usr/bin/env bash
# One GPU call (~4-5 minutes, limits add up to 7 min): are the stream plan's 300-step curves those of the same 8-bit
# AdamW stepped after backward (fused) and inside backward (gpu_8bit)?
#   1. deterministic kernels, seed 1: fused, gpu_8bit and stream must give identical train curves (on the CPU they
#      do, bit for bit); the first step where they differ points at a race in the stream schedule.
#   2. default (atomic-add) kernels, seed 1: the same three runs; fused vs gpu_8bit (same math, same placement of
#      everything on the GPU) shows how far run-to-run noise alone moves the final loss.
# MODES="deterministic" runs only the first. Logs and curves (JSON) land in $OUT; a compact table is printed last.
set -uo pipefail
source bench/device_setup.sh checkout || exit 1
for mode in ${MODES:-deterministic default}; do
  flag=""; [[ $mode == deterministic ]] && flag="--deterministic"
  timeout 200 python3 bench/optim_convergence.py --runs reference fused gpu_8bit stream --seeds 1 $flag \
    --curves "$OUT/curves_$mode.json" > "$OUT/convergence_$mode.txt" 2>&1 || echo "$mode: exit $?"
done
for mode in ${MODES:-deterministic default}; do
  echo "== $mode kernels"; grep "^|" "$OUT/convergence_$mode.txt"
  python3 - "$OUT/curves_$mode.json" <<'PY' || true
import json, sys
curves = json.load(open(sys.argv[1]))["1"]
for name in ("gpu_8bit", "stream"):
    a, b = curves["fused"], curves.get(name, [])
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    gap = max((abs(x - y) for x, y in zip(a, b)), default=float("nan"))
    print(f"{name} vs fused: {len(b)} steps, first differing step {first}, max |train loss diff| {gap:.4g}")
PY
done
