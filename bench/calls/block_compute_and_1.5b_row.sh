#!/usr/bin/env bash
# One GPU call (~9.5 minutes): where a block's compute time goes at 8B, 19B and 32.8B (GEMMs alone, eager,
# torch.compile; issue "The streaming plan": measured/limit), then the benchmark's probe and R1 at 1.5B for every
# method until the call's deadline (issue "The benchmark"). Results and the rendered table land in $OUT.
set -uo pipefail
source bench/device_setup.sh package || exit 1
started=$SECONDS
timeout 200 python3 bench/block_compute.py --sizes 8b,19b,32.8b 2>&1 | grep -E "RESULT|TFLOP|Error" | cut -c1-600
echo "block_compute took $((SECONDS - started)) s"
python3 bench/run.py --probe --sizes 1.5b --regimes r1 --timeout-s 150 --deadline-s $((420 - (SECONDS - started))) \
    --results "$OUT/results.jsonl" --report "$OUT/MATRIX.md" > "$OUT/run.out" 2>&1
tail -5 "$OUT/run.out"
cat "$OUT/MATRIX.md" | cut -c1-400
echo "took $((SECONDS - started)) s"
