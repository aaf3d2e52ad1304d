#!/usr/bin/env bash
# One GPU call (~8 minutes), issue "The streaming plan", measured/limit: the probe's attention and GEMM figures and
# the benchmark's compiled-stream cell at 32.8B (planner defaults) in one run; the same plan with cuDNN's attention
# kernel preferred over flash; then where one layer's time goes (block_compute, with attention alone).
set -uo pipefail
source bench/device_setup.sh checkout || exit 1
started=$SECONDS
python3 bench/run.py --probe matmul,model_matmuls,model_attention --sizes 32.8b --regimes r1 \
  --methods single_gpu_offload_stream_compiled --timeout-s 200 --results "$OUT/results.jsonl" > "$OUT/run.out" 2>&1
grep -E "^(probe|[0-9.]+b/)" "$OUT/run.out" | cut -c1-300
echo "matrix took $((SECONDS - started)) s"
timeout 170 python3 bench/stream_step.py --size 32.8b --steps 7 --resident-blocks 48 --no-planner-check \
  --compile-blocks --sdpa cudnn > "$OUT/stream_32.8b_cudnn.log" 2>&1
grep -E "^RESULT|Error" "$OUT/stream_32.8b_cudnn.log" | tail -2 | cut -c1-900
echo "cudnn took $((SECONDS - started)) s"
timeout $((560 - (SECONDS - started))) python3 bench/block_compute.py --sizes 32.8b,19b > "$OUT/block_compute.log" 2>&1
grep -E "^RESULT|^bf16|Error" "$OUT/block_compute.log" | cut -c1-900
tail -c 1500 "$OUT/results.jsonl"
echo "took $((SECONDS - started)) s"
