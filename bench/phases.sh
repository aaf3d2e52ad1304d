# Sourced by GPU call scripts: `phases LIMIT NAME [hostadam_phases.py arguments]` runs bench/hostadam_phases.py under a
# time limit, leaves its JSON, Chrome trace and log in $OUT as phases_NAME.*, and prints its per-phase table.
phases() {
  local limit=$1 name=$2; shift 2
  timeout "$limit" python3 bench/hostadam_phases.py --out "$OUT/phases_$name.json" "$@" > "$OUT/phases_$name.log" 2>&1
  grep -A9 " one step" "$OUT/phases_$name.log" || tail -3 "$OUT/phases_$name.log"
}
