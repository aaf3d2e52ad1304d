#!/usr/bin/env bash
# One GPU call (~9 minutes): 14.8B, R1 then R2, our rows beside torchtune's method in this call: in R1 its defaults
# and compiled with its linear cross-entropy (optimizer stepped in backward), in R2 its accumulating mode (one
# PagedAdamW8bit stepped after the micro-batches; its bf16 gradients and 8-bit state exceed the card beside the
# weights, so bitsandbytes pages the state to host memory). torchao's offload is not here: at 14.8B it runs out of
# host memory (measured in R1), and accumulating on the GPU keeps the same host state. Tables at the end.
set -uo pipefail
source bench/device_setup.sh checkout || exit 1
started=$SECONDS
timeout 260 python3 bench/run.py --sizes 14.8b --regimes r1 --timeout-s 150 --deadline-s 240 \
  --methods single_gpu_offload_gpu_8bit_compiled,torchtune_compiled,torchtune \
  --results "$OUT/rivals_14b.jsonl" --log "$OUT/rivals_14b_cells.log" > "$OUT/rivals_14b_r1_run.txt" 2>&1
echo "R1 done at $((SECONDS - started)) s"
left=$(( 500 - (SECONDS - started) ))
timeout "$left" python3 bench/run.py --sizes 14.8b --regimes r2 --timeout-s 220 --deadline-s $(( left - 20 )) \
  --methods single_gpu_offload_stream_compiled,torchtune_accumulating,single_gpu_offload_gpu_8bit_compiled \
  --results "$OUT/rivals_14b.jsonl" --log "$OUT/rivals_14b_cells.log" > "$OUT/rivals_14b_r2_run.txt" 2>&1
echo "R2 done at $((SECONDS - started)) s"
python3 bench/rivals_table.py "$OUT/rivals_14b.jsonl" \
  --ours single_gpu_offload_gpu_8bit_compiled,single_gpu_offload_stream_compiled
python3 bench/rivals_table.py "$OUT/rivals_14b.jsonl" --ours single_gpu_offload_stream_compiled
echo "took $((SECONDS - started)) s"
