#!/usr/bin/env bash
# On the GPU machine: the host_adam backend's GPU tests, its benchmark rows beside the plain loop and torchao's CPU
# offload (3.6B R1 and R2; 8B R2 against torchao's 8B R1 tokens/s), and one step's per-phase timing.
#   bash bench/gpu_hostadam.sh          # everything, ~8 minutes expected (time limits add up to 11.5)
#   bash bench/gpu_hostadam.sh 3.6b     # one part: tests | 3.6b | 8b | phases (to split across two calls)
# Logs, results.jsonl, the phase JSON and a Chrome trace land in $OUT; a compact table is printed last.
set -uo pipefail
PART=${1:-all}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-build-isolation . || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
RESULTS="$OUT/hostadam.jsonl"
HOST_ADAM=single_gpu_offload_host_adam
wants() { [ "$PART" = all ] || [ "$PART" = "$1" ]; }
cell() {  # time limit in seconds, then bench/run.py arguments
  local budget=$1; shift
  timeout "$budget" python3 bench/run.py --results "$RESULTS" --log "$OUT/hostadam_cells.log" "$@" || true
}

if wants tests; then
  timeout 90 python3 -m pytest -q -m gpu tests/backends/test_host_adam_gpu.py -p no:cacheprovider --tb=short \
    > "$OUT/gpu_tests_host_adam.txt" 2>&1; tail -3 "$OUT/gpu_tests_host_adam.txt"
fi
if wants 3.6b; then
  cell 170 --sizes 3.6b --methods plain,torchao_offload,$HOST_ADAM --regimes r1 --steps 6 --warmup 2
  cell 110 --sizes 3.6b --methods plain,$HOST_ADAM --regimes r2 --steps 4 --warmup 1
fi
if wants 8b; then
  cell 110 --sizes 8b --methods torchao_offload --regimes r1 --steps 5 --warmup 2
  cell 140 --sizes 8b --methods $HOST_ADAM --regimes r2 --steps 4 --warmup 1
fi
if wants phases; then
  timeout 80 python3 bench/hostadam_phases.py --size 3.6b --out "$OUT/hostadam_phases_3.6b_r1.json" \
    > "$OUT/hostadam_phases.log" 2>&1; grep -A7 "^host_adam one step" "$OUT/hostadam_phases.log" || tail -5 "$OUT/hostadam_phases.log"
fi
[ -f "$RESULTS" ] && python3 - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print(f"{'cell':<52}{'status':<10}{'s/step':>8}{'tok/s':>10}{'GPU GiB':>9}{'RSS GiB':>9}")
for r in rows:
    print(f"{r.get('cell', '?'):<52}{r.get('status', '?'):<10}{r.get('step_s_median', ''):>8}"
          f"{r.get('tokens_per_s', ''):>10}{r.get('peak_gpu_device_gib', ''):>9}{r.get('peak_host_rss_gib', ''):>9}")
PY
