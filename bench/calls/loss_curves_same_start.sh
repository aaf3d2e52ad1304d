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
python3 bench/compare_curves.py "$OUT/curves_seeds.json" gpu_8bit stream
echo "took $((SECONDS - started)) s"
