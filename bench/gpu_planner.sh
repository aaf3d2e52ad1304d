#!/usr/bin/env bash
# On the GPU machine: the planner's predictions against measured runs (issue "The memory planner") and the memory
# levers at 3.6B (issue "Compose the memory levers"), one process per run, highest priority first; each prints a
# RESULT line with measured step time / peaks and the planner's `plan/*` predictions. A run the planner refuses
# prints the refusal and how long it took to come. Usage: bash bench/gpu_planner.sh  (from the repository root)
set -uo pipefail
source bench/device_setup.sh package || exit 1
started=$SECONDS
COMMON=(data=random_tokens trainer.max_steps=5 trainer.limit_val_batches=0 data.num_batches=5
        trainer.enable_progress_bar=false "~callbacks.model_checkpoint")
run() {  # run <seconds> <overrides...>: skipped when the call's time would run out
  local limit=$1; shift
  if (( SECONDS - started + limit > ${BUDGET_S:-540} )); then echo "SKIPPED (time) $*"; return; fi
  local t0=$SECONDS
  timeout "$limit" python3 bench/main_job_gpu.py "$@" "${COMMON[@]}" > "$OUT/run.log" 2>&1
  local status=$?
  grep -h RESULT "$OUT/run.log" || echo "FAILED ($status after $((SECONDS - t0)) s) $*: $(grep -E 'PlanDoesNotFit|Error' "$OUT/run.log" | tail -1 | cut -c1-600)"
  grep -h -A3 "^Chosen\|Plans for" "$OUT/run.log" | head -4
  cat "$OUT/run.log" >> "$OUT/all.log"
}
run 120 model=llama_1b strategy=auto
run 150 model=llama_1b strategy=fsdp activation_checkpointing=full
run 60 model=llama_8b strategy=deepspeed activation_checkpointing=full
run 150 model=llama_3b strategy=auto
run 150 model=llama_3b strategy=gpu_8bit optimizer=adamw8bit activation_checkpointing=full
run 150 model=llama_3b strategy=fsdp activation_checkpointing=full
run 150 model=llama_3b strategy=gpu_8bit optimizer=adamw8bit activation_checkpointing=offload
run 150 model=llama_3b strategy=gpu_8bit optimizer=adamw8bit activation_checkpointing=none
echo "took $((SECONDS - started)) s"
