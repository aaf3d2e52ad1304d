#!/usr/bin/env bash
# One GPU call (~7 minutes): how much of the plans' distance from fp32 AdamW is bf16 compute alone. Same starts,
# deterministic kernels, four seeds: at lr 1e-3 the reference, the usual bf16 recipe (fp32 AdamW under bf16
# autocast) and the three plans; at the main job's lr 3e-3 the reference and the bf16 recipe (the plans' rows at
# 3e-3 come from bench/calls/loss_curves_same_start.sh). Logs in $OUT.
set -uo pipefail
source bench/device_setup.sh checkout || exit 1
started=$SECONDS
timeout 330 python3 bench/optim_convergence.py --lr 1e-3 --runs reference reference_bf16 gpu_8bit host_adam stream \
  --seeds 1 1234 2 3 --deterministic --curves "$OUT/curves_lr1e-3.json" > "$OUT/convergence_lr1e-3.txt" 2>&1 \
  || echo "lr 1e-3: exit $?"
grep "^|" "$OUT/convergence_lr1e-3.txt"
timeout $((450 - (SECONDS - started))) python3 bench/optim_convergence.py --runs reference reference_bf16 \
  --seeds 1 1234 2 3 --deterministic > "$OUT/convergence_bf16_lr3e-3.txt" 2>&1 || echo "lr 3e-3: exit $?"
grep "^|" "$OUT/convergence_bf16_lr3e-3.txt"
echo "took $((SECONDS - started)) s"
