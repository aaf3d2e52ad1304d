#!/usr/bin/env bash
# One GPU call (~9 minutes), issue "Fine-tune a pretrained model end to end": an 8B Llama checkpoint (random init,
# bf16, save_pretrained, 16 GB) loaded with `lightning_offload.pretrained` under backend="auto" and "gpu_8bit":
# load time (GB/s from disk), peak host RSS while loading against the plan's host estimate, s/step against the same
# model from random init; then the gpu_8bit run's weights exported with `export_hf` (time, peak RSS).
# Disk: 16 GB pretrained + 16 GB trained weights + 16 GB export at most; each is deleted once read.
set -uo pipefail
source bench/device_setup.sh checkout || exit 1
started=$SECONDS
work=/tmp/finetune_8b; rm -rf "$work"; mkdir -p "$work"
phase() {  # name, time limit (s), arguments of bench/finetune_8b.py
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 bench/finetune_8b.py "$@" > "$OUT/$name.log" 2>&1
  echo "$name (rc $?, $((SECONDS - started)) s): $(grep -E '^RESULT|Error' "$OUT/$name.log" | tail -1 | cut -c1-1200)"
}
phase create 100 create --folder "$work/pretrained"
phase auto_pretrained 130 train --folder "$work/pretrained" --backend auto
phase auto_random 110 train --folder "$work/pretrained" --backend auto --source random
phase gpu_8bit_pretrained 110 train --folder "$work/pretrained" --backend gpu_8bit --save "$work/trained.ckpt"
rm -f "$work"/pretrained/*.safetensors   # the export needs only the config from here
phase export 80 export --checkpoint "$work/trained.ckpt" --config "$work/pretrained" --out "$work/exported" --check \
  --delete
rm -rf "$work"
echo "took $((SECONDS - started)) s"
