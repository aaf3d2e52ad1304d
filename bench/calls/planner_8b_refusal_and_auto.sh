#!/usr/bin/env bash
# One GPU call (~6 minutes): the planner at 8B (issue "The memory planner"). A DeepSpeed plan that cannot fit host RAM
# must be refused within 60 s; `backend="auto"` on the same model must then train (main job, llama_8b config); then
# the benchmark's 8B R1 gpu_8bit cell, whose host RSS is measured for the first time without Lightning's teardown
# copy. Each RESULT / cell row carries the planner's predictions. Logs in $OUT; a table is printed last.
set -uo pipefail
source bench/device_setup.sh package || exit 1
started=$SECONDS
COMMON=(data=random_tokens trainer.max_steps=5 trainer.limit_val_batches=0 data.num_batches=5
        trainer.enable_progress_bar=false +trainer.enable_checkpointing=false "~callbacks.model_checkpoint")
main_job() {  # main_job <seconds> <name> <overrides...>
  local limit=$1 name=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" python3 bench/main_job_gpu.py "$@" "${COMMON[@]}" > "$OUT/$name.log" 2>&1
  local status=$?
  echo "== $name: exit $status after $((SECONDS - t0)) s"
  grep -h RESULT "$OUT/$name.log" || grep -E 'PlanDoesNotFit|Error' "$OUT/$name.log" | tail -1 | cut -c1-700
  grep -h -A2 "^Chosen" "$OUT/$name.log" | head -3
}
[[ ${SKIP_REFUSAL:-} ]] || main_job 60 refused_8b_deepspeed model=llama_8b strategy=deepspeed activation_checkpointing=full
main_job 200 auto_8b model=llama_8b strategy=auto
[[ ${SKIP_CELL:-} ]] || PYTHONPATH=/tmp/site:$PWD timeout 200 python3 bench/run.py --sizes 8b --regimes r1 \
  --methods single_gpu_offload_gpu_8bit --steps 6 --warmup 2 --timeout-s 180 \
  --results "$OUT/planner8b.jsonl" --log "$OUT/planner8b_cells.log" > "$OUT/planner8b_run.txt" 2>&1
python3 - "$OUT/planner8b.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    keys = ("cell", "status", "cause", "step_s_median", "tokens_per_s", "model_tflops", "peak_gpu_torch_gib",
            "peak_gpu_device_gib", "peak_host_rss_gib", "plan", "predicted_step_s", "predicted_gpu_gib",
            "predicted_host_gib", "error")
    print({k: r[k] for k in keys if k in r})
PY
echo "took $((SECONDS - started)) s"
