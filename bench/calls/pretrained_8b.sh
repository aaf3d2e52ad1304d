#!/usr/bin/env bash
# One GPU call (~8 minutes): an 8B fine-tune that loads its checkpoint with `from_pretrained` in `configure_model`
# (which the meta device cannot run) beside the same model built from its config, under `single_gpu_offload`, R1
# (4 x 2048 tokens, bf16-mixed, AdamW lr 1e-5): the strategy's defaults, then `compile_blocks=True,
# optimizer="adamw8bit_fused"`. Both sources must get the same plan and step times within 5% of each other. The
# checkpoint (random init, 16 GB of bf16 safetensors) is written to /tmp first. One RESULT line per fit; logs in $OUT.
set -uo pipefail
source bench/device_setup.sh package || exit 1
started=$SECONDS
PYTHONPATH=/tmp/site:$PWD timeout 540 python3 bench/pretrained.py --size 8b --folder /tmp/llama_8b_pretrained \
  --steps 6 --warmup 2 --timeout-s 150 --results "$OUT/pretrained_8b.jsonl" 2>&1 | tee "$OUT/pretrained_8b.log" \
  | grep -v '^step '
echo "took $((SECONDS - started)) s"
