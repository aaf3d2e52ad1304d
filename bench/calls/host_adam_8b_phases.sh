#!/usr/bin/env bash
# One GPU call (~5 minutes): where an 8B R1 `host_adam` step's time goes with the planner's plan, the updated weights
# cast on the GPU (the default) and on the host - the per-phase timing of bench/hostadam_phases.py. Phase JSONs,
# Chrome traces and logs land in $OUT.
set -uo pipefail
source bench/device_setup.sh package || exit 1
started=$SECONDS
source bench/phases.sh
phases 150 hostadam_8b --size 8b
phases 150 hostadam_8b_cast_on_host --size 8b --cast-on-host
echo "took $((SECONDS - started)) s"
