#!/usr/bin/env bash
# On the GPU machine: the memory levers on a 3.6B Llama (micro-batch 4 x 2048), one process per combination, in
# order, each skipped once the call's budget (BUDGET_S, default 540 s) would run out; one RESULT line each.
# Usage: [BUDGET_S=540] [COMBOS="strategy=... optimizer=... activation_checkpointing=...;..."] bash bench/levers_gpu.sh [overrides]
set -uo pipefail
source bench/device_setup.sh package || exit 1
started=$SECONDS
COMMON=(model=llama_3b data=random_tokens trainer.max_steps=5 trainer.limit_val_batches=0 data.num_batches=5
        trainer.enable_progress_bar=false +trainer.enable_checkpointing=false "~callbacks.model_checkpoint" "$@")
DEFAULT_COMBOS="strategy=gpu_8bit optimizer=adamw8bit activation_checkpointing=full;strategy=gpu_8bit optimizer=adamw8bit activation_checkpointing=none;\
strategy=gpu_8bit optimizer=adamw8bit activation_checkpointing=offload;strategy=fsdp optimizer=adamw activation_checkpointing=full;\
strategy=fsdp optimizer=adamw8bit activation_checkpointing=full;strategy=deepspeed optimizer=cpu_adam activation_checkpointing=full;\
strategy=deepspeed optimizer=cpu_adam activation_checkpointing=offload;strategy=deepspeed optimizer=adamw8bit activation_checkpointing=full"
[[ ${COMBOS:-$DEFAULT_COMBOS} == *deepspeed* ]] && python3 -c "import torch; from deepspeed.ops.adam import DeepSpeedCPUAdam; DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(1))])" > /dev/null 2>&1
IFS=';' read -ra combos <<< "${COMBOS:-$DEFAULT_COMBOS}"
for combo in "${combos[@]}"; do
  limit=$(( ${BUDGET_S:-540} - (SECONDS - started) ))
  (( limit > 150 )) && limit=150
  if (( limit < 45 )); then echo "SKIPPED (call budget) $combo"; continue; fi
  t0=$SECONDS
  # shellcheck disable=SC2086
  timeout "$limit" python3 bench/main_job_gpu.py $combo "${COMMON[@]}" > "$OUT/levers.log" 2>&1
  status=$?
  grep RESULT "$OUT/levers.log" || echo "FAILED ($status after $((SECONDS - t0)) s, limit $limit) $combo: $(grep -E 'Error|error' "$OUT/levers.log" | tail -1 | cut -c1-400)"
  cat "$OUT/levers.log" >> "$OUT/levers_all.log"
done
echo "took $((SECONDS - started)) s"
