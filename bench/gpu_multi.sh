#!/usr/bin/env bash
# On nvidia-h200-x2 (2 GPUs, 256 GiB RAM): the main job with `strategy="offload"` on 1 and on 2 GPUs of one
# machine, Llama-shaped 8B and 14.8B, DeepSpeed ZeRO-3 offload and FSDP2 offload; table printed last.
#     bash bench/gpu_multi.sh                      # every cell (~50 min: more than one device call allows)
#     bash bench/gpu_multi.sh 8b deepspeed     # only the cells matching the filters (size, strategy, GPUs)
#     bash bench/gpu_multi.sh 14.8b fsdp 2
# Cells: 8B ~3-4 min each, 14.8B ~5-8 min each (host memory pinning ~1.7 GiB/s dominates start-up), so one device
# call (10 min) takes one 8B pair or one 14.8B cell. Results accumulate in $OUT/multi_gpu.jsonl (copy it between
# calls to keep earlier cells in the table); logs of each cell in $OUT/<cell>.log.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SIZE=${1:-}; STRATEGY=${2:-}; GPUS=${3:-}
CELL_TIMEOUT_S=${CELL_TIMEOUT_S:-540}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-build-isolation . || exit 1
# Build DeepSpeed's CPU Adam once, outside any time limit (a killed build leaves a lock behind).
python3 -c "import torch; from deepspeed.ops.adam import DeepSpeedCPUAdam; DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(1))])" > /dev/null 2>&1
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader || true
free -g | head -2
AVAILABLE_GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)

# size strategy optimizer extra-overrides. 14.8B: CPU Adam's 16 B/param plus the offloaded bf16 weights (18 B/param,
# 266 GB) exceed 256 GiB, so DeepSpeed keeps its bf16 partitions on the GPUs; FSDP2 steps 8-bit state (10 B/param).
CELLS=(
  "8b deepspeed user"
  "8b fsdp adamw"
  "14.8b deepspeed user strategy.offload_parameters=false"
  "14.8b fsdp adamw8bit"
)
for cell in "${CELLS[@]}"; do
  read -r size strategy optimizer extra <<< "$cell"
  [[ -n "$SIZE" && "$SIZE" != "$size" ]] && continue
  [[ -n "$STRATEGY" && "$STRATEGY" != "$strategy" ]] && continue
  for devices in 1 2; do
    [[ -n "$GPUS" && "$GPUS" != "$devices" ]] && continue
    if (( devices > AVAILABLE_GPUS )); then echo "SKIP $cell x$devices: $AVAILABLE_GPUS GPU(s)"; continue; fi
    # shellcheck disable=SC2086
    timeout $((CELL_TIMEOUT_S + 30)) python3 bench/multi_gpu.py run --size "$size" --strategy "$strategy" \
      --optimizer "$optimizer" --devices "$devices" --timeout-s "$CELL_TIMEOUT_S" --out "$OUT" $extra \
      | grep RESULT || echo "FAILED $cell x$devices (see $OUT)"
  done
done
python3 bench/multi_gpu.py report "$OUT/multi_gpu.jsonl" | tee "$OUT/multi_gpu.md"
