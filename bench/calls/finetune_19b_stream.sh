#!/usr/bin/env bash
# One GPU call (~9.5 minutes), issue "Fine-tune a pretrained model end to end": a 19B Llama checkpoint (random init,
# bf16, save_pretrained, 38 GB) loaded with `lightning_offload.pretrained` under backend="stream": load rate from disk
# (the reads alone, and all of setup), peak host RSS until the first batch against the plan's host estimate, s/step
# against the same model from random init; then the trained weights exported with `export_hf` (time, peak RSS).
# Disk (64 GiB): one 19B copy at a time. The pretrained weights are deleted once trained, before the trained weights
# are saved (the stream folder without its 8-bit state: 38 GB, where the state would add 38 more); the export is
# written to /dev/shm (RAM, free once training has ended) when it has room, and skipped otherwise.
set -uo pipefail
source bench/device_setup.sh checkout || exit 1
started=$SECONDS
work=/tmp/finetune_19b; rm -rf "$work"; mkdir -p "$work"
df -h /tmp /dev/shm | sed 's/^/disk: /'
phase() {  # name, time limit (s), arguments of bench/finetune_8b.py; each limit cut to what is left of 580 s
  local name=$1 limit=$2 left=$((580 - (SECONDS - started))); shift 2
  (( left < limit )) && limit=$left
  (( limit < 30 )) && { echo "$name: skipped, $left s left of the call"; return; }
  timeout "$limit" python3 bench/finetune_8b.py "$@" > "$OUT/$name.log" 2>&1
  echo "$name (rc $?, $((SECONDS - started)) s): $(grep -E '^RESULT|Error' "$OUT/$name.log" | tail -1 | cut -c1-1500)"
}
phase create 170 create --size 19b --folder "$work/pretrained"
phase stream_pretrained 220 train --size 19b --folder "$work/pretrained" --backend stream --delete-source \
  --save-stream-weights "$work/trained.ckpt"
rm -f "$work"/pretrained/*.safetensors   # the export and the random-init run need only the config from here
if (( $(df --output=avail -B1 /dev/shm | tail -1) > 40 * 1000**3 )); then
  phase export 100 export --checkpoint "$work/trained.ckpt" --config "$work/pretrained" --out /dev/shm/exported \
    --check --delete
else
  echo "export: skipped, /dev/shm has under 40 GB free and the disk holds the trained weights"
fi
rm -rf "$work/trained.ckpt" /dev/shm/exported /dev/shm/.exported.*   # a killed export leaves its staging folder
phase stream_random 120 train --size 19b --folder "$work/pretrained" --backend stream --source random
rm -rf "$work"
echo "took $((SECONDS - started)) s"
