#!/usr/bin/env bash
# One GPU call (~4 minutes): host_adam with every block's state in host memory, its updated weights cast to bf16 on
# the GPU (the default) and on the host, beside fp32 AdamW: same starts, deterministic kernels, four seeds, lr 1e-3.
# Both casts round to nearest even, so the two curves must be equal at every step. Logs in $OUT.
set -uo pipefail
source bench/device_setup.sh checkout || exit 1
started=$SECONDS
timeout 400 python3 bench/optim_convergence.py --lr 1e-3 \
  --runs reference host_adam_all_host host_adam_all_host_cast_on_host --seeds 1 1234 2 3 --deterministic \
  --curves "$OUT/curves_host_adam_cast.json" > "$OUT/convergence_host_adam_cast.txt" 2>&1 || echo "exit $?"
grep "^|" "$OUT/convergence_host_adam_cast.txt"
python3 bench/compare_curves.py "$OUT/curves_host_adam_cast.json" host_adam_all_host host_adam_all_host_cast_on_host
echo "took $((SECONDS - started)) s"
