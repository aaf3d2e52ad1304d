#!/usr/bin/env bash
# On the GPU machine: the memory levers on a 3.6B Llama (micro-batch 4 x 2048), one process per combination.
# Usage: bash bench/levers_gpu.sh [extra overrides...]; prints one RESULT line per combination.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-build-isolation . || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import torch; from deepspeed.ops.adam import DeepSpeedCPUAdam; DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(1))])" > /dev/null 2>&1
COMMON=(model=llama_3b data=random_tokens trainer.max_steps=5 trainer.limit_val_batches=0 data.num_batches=5
        trainer.enable_progress_bar=false "~callbacks.model_checkpoint" "$@")
for combo in "strategy=deepspeed_cpu optimizer=cpu_adam checkpointing=full" \
             "strategy=deepspeed_cpu optimizer=adamw8bit checkpointing=full" \
             "strategy=fsdp_cpu optimizer=adamw8bit checkpointing=full" \
             "strategy=gpu_only optimizer=adamw8bit checkpointing=full" \
             "strategy=gpu_only optimizer=adamw8bit checkpointing=none"; do
  # shellcheck disable=SC2086
  timeout 300 python3 bench/main_job_gpu.py $combo "${COMMON[@]}" > "$OUT/levers.log" 2>&1
  status=$?
  grep RESULT "$OUT/levers.log" || echo "FAILED ($status) $combo: $(grep -E 'Error|error' "$OUT/levers.log" | tail -1)"
done
