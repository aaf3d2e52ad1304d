#!/usr/bin/env bash
# One GPU call (~5 minutes): where an 8B R1 `host_adam` step's time goes with the planner's plan, the updated weights
# cast on the GPU (the default) and on the host - the per-phase timing of bench/hostadam_phases.py. Phase JSONs,
# Chrome traces and logs land in $OUT.
set -uo pipefail
source bench/device_setup.sh package || exit 1
started=$SECONDS
phases() {  # limit, name, then hostadam_phases.py arguments
  local limit=$1 name=$2; shift 2
  timeout "$limit" python3 bench/hostadam_phases.py --out "$OUT/phases_$name.json" "$@" > "$OUT/phases_$name.log" 2>&1
  grep -A9 " one step" "$OUT/phases_$name.log" || tail -3 "$OUT/phases_$name.log"
}
phases 150 hostadam_8b --size 8b
phases 150 hostadam_8b_cast_on_host --size 8b --cast-on-host
echo "took $((SECONDS - started)) s"
