#!/usr/bin/env bash
# On the GPU machine (~9 minutes): the streaming plan's GPU tests, a per-phase step timing at 19B, 32.8B and 40.8B
# (R1: micro-batch 4 x 2048), then the benchmark rows of `single_gpu_offload_stream` beside the probe.
# Notes: the disk is 64 GiB (no checkpoints are written here); pinning registers ~80 GiB at 32.8B and ~105 GiB at
# 40.8B at ~6 GiB/s after zeroing it (~30-40 s of setup per cell before the first step).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 120 python3 -m pytest -q -m gpu tests/backends/test_stream_gpu.py -p no:cacheprovider --tb=short \
  > "$OUT/stream_gpu_tests.txt" 2>&1; tail -3 "$OUT/stream_gpu_tests.txt"
for size in 19b 32.8b 40.8b; do
  # 40.8B runs >= 20 steps for the falling-loss acceptance; the others 6.
  steps=6; [ "$size" = 40.8b ] && steps=20
  timeout 170 python3 bench/stream_step.py --size "$size" --steps "$steps" > "$OUT/stream_$size.log" 2>&1 || true
  grep -E "^RESULT|Error" "$OUT/stream_$size.log" | tail -2
done
# The harness rows (probe limit and measured/limit) for the table in bench/RESULTS.md.
timeout 150 python3 bench/run.py --probe --sizes 19b --methods single_gpu_offload_stream --regimes r1 \
  --results "$OUT/results.jsonl" > "$OUT/stream_bench.log" 2>&1 || true
python3 bench/report.py "$OUT/results.jsonl" 2>/dev/null | tail -15 || true
