#!/usr/bin/env bash
# One GPU call (~8 minutes) for a short device budget: the 8B `from_pretrained` fine-tune beside the same model
# built from its config under the strategy's defaults (bench/pretrained.py), then the conformance modules on the GPU
# (tests/conformance/test_gpu.py). Logs in $OUT.
set -uo pipefail
source bench/device_setup.sh package || exit 1
export PYTHONPATH=/tmp/site:$PWD
started=$SECONDS
timeout 300 python3 bench/pretrained.py --size 8b --folder /tmp/llama_8b_pretrained --variants default \
  --steps 6 --warmup 2 --timeout-s 120 --results "$OUT/pretrained_8b.jsonl" > "$OUT/pretrained_8b.log" 2>&1
echo "pretrained rc $? at $((SECONDS - started)) s"; grep -v '^step ' "$OUT/pretrained_8b.log" | tail -25 | cut -c1-600
rm -rf /tmp/llama_8b_pretrained
CONFORMANCE_GPU_RECORD=$OUT/conformance_gpu.jsonl timeout $((480 - (SECONDS - started))) python3 -m pytest -q -m gpu -p no:cacheprovider --durations=5 \
  tests/conformance/test_gpu.py > "$OUT/conformance_gpu.log" 2>&1
echo "conformance rc $? at $((SECONDS - started)) s"
grep -E "passed|failed|FAILED|ERROR" "$OUT/conformance_gpu.log" | tail -30 | cut -c1-300
