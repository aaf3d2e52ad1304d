#!/usr/bin/env bash
# One GPU call (~5 minutes): 300-step loss curves on four seeds with every run starting from the same weights (drawn
# on the CPU: backends build where their weights live, so a seed alone gave the streaming plan other initial
# weights than the GPU-resident runs), deterministic kernels. gpu_8bit and stream run the same 8-bit math (gpu_8bit
# equals the fused optimizer stepped after backward exactly, bench/gpu_streamnum.sh): their curves must be equal.
set -uo pipefail
source bench/device_setup.sh checkout || exit 1
started=$SECONDS
timeout 420 python3 bench/optim_convergence.py --runs reference gpu_8bit host_adam stream --seeds 1 1234 2 3 \
  --deterministic --curves "$OUT/curves_seeds.json" > "$OUT/convergence_seeds.txt" 2>&1 || echo "exit $?"
grep "^|" "$OUT/convergence_seeds.txt"
python3 - "$OUT/curves_seeds.json" <<'PY'
import json, sys
for seed, curves in json.load(open(sys.argv[1])).items():
    a, b = curves["gpu_8bit"], curves.get("stream", [])
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    gap = max((abs(x - y) for x, y in zip(a, b)), default=float("nan"))
    print(f"seed {seed}: stream vs gpu_8bit over {len(b)} steps: first differing step {first}, max |diff| {gap:.4g}")
PY
echo "took $((SECONDS - started)) s"
