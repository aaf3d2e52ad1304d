#!/usr/bin/env bash
# On the GPU machine: host_adam with the planner's share of optimizer state on the GPU, and with everything on the
# host (gpu_state_blocks=0), beside the plain loop and torchao's CPU offload; then 8B and one step's phases.
#   bash bench/gpu_hostadam.sh      # part 1: GPU tests; 3.6B R1 plain, torchao_offload, host_adam (planner's share),
#                                   # host_adam_all_host, the same with weights cast on the GPU. Limits add up to
#                                   # 7 min with the install (~25 s).
#   bash bench/gpu_hostadam.sh r2   # 3.6B R2 plain and host_adam (~3 min).
#   bash bench/gpu_hostadam.sh 8b   # part 2: 8B R1 torchao_offload, 8B R2 host_adam; phases of one 3.6B R1 step at
#                                   # share 0 (casting on the host, then on the GPU) and at the planner's share.
#                                   # Limits add up to 9 min.
#   bash bench/gpu_hostadam.sh "r1 phases"   # any of the pieces: tests r1 r2 8b-cells phases
# Logs, hostadam.jsonl, the phase JSONs and Chrome traces land in $OUT; a compact table is printed last.
set -uo pipefail
case "${1:-3.6b}" in
  3.6b) PIECES="tests r1" ;;
  8b) PIECES="8b-cells phases" ;;
  *) PIECES="$1" ;;
esac
source bench/device_setup.sh package || exit 1
RESULTS="$OUT/hostadam.jsonl"
HOST_ADAM=single_gpu_offload_host_adam
wants() { [[ " $PIECES " == *" $1 "* ]]; }
cells() {  # per-cell time limit in seconds, then bench/run.py arguments (a cell past its limit is recorded as such)
  local limit=$1; shift
  python3 bench/run.py --results "$RESULTS" --log "$OUT/hostadam_cells.log" --timeout-s "$limit" "$@" || true
}
source bench/phases.sh

if wants tests; then
  timeout 55 python3 -m pytest -q -m gpu tests/backends/test_host_adam_gpu.py -p no:cacheprovider --tb=short \
    > "$OUT/gpu_tests_host_adam.txt" 2>&1; tail -3 "$OUT/gpu_tests_host_adam.txt"
fi
if wants r1; then
  cells 65 --sizes 3.6b --methods plain,torchao_offload,$HOST_ADAM,${HOST_ADAM}_all_host,${HOST_ADAM}_all_host_cast_on_device \
    --regimes r1 --steps 4 --warmup 1
fi
if wants r2; then
  cells 85 --sizes 3.6b --methods plain,$HOST_ADAM --regimes r2 --steps 3 --warmup 1
fi
if wants 8b-cells; then
  cells 120 --sizes 8b --methods torchao_offload --regimes r1 --steps 5 --warmup 2
  cells 150 --sizes 8b --methods $HOST_ADAM --regimes r2 --steps 3 --warmup 1
fi
if wants phases; then
  phases 75 share0_cast_on_host --size 3.6b --gpu-state-blocks 0 --cast-on-host
  phases 75 share0 --size 3.6b --gpu-state-blocks 0
  phases 75 planned --size 3.6b
fi
[ -f "$RESULTS" ] && python3 - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print(f"{'cell':<58}{'status':<10}{'s/step':>8}{'tok/s':>10}{'GPU GiB':>9}{'RSS GiB':>9}  plan (predicted s/step)")
for r in rows:
    planned = f"{r['plan']} ({r.get('predicted_step_s', '')})" if r.get("plan") else ""
    print(f"{r.get('cell', '?'):<58}{r.get('status', '?'):<10}{r.get('step_s_median', ''):>8}"
          f"{r.get('tokens_per_s', ''):>10}{r.get('peak_gpu_device_gib', ''):>9}{r.get('peak_host_rss_gib', ''):>9}"
          f"  {planned}")
PY
