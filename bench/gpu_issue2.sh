#!/usr/bin/env bash
# On the GPU machine: GPU tests, the main job with its defaults, and a 1.5B Llama through single_gpu_offload.
# Wheels for what the machine lacks are in .whl/ (see bench/README or the device notes).
set -uo pipefail
source bench/device_setup.sh package || exit 1
# Build DeepSpeed's CPU Adam once, with no time limit around it (a killed build leaves a lock behind).
python3 -c "import torch; from deepspeed.ops.adam import DeepSpeedCPUAdam; DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(1))])" 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pytest -q -m gpu tests -p no:cacheprovider --tb=short > "$OUT/gpu_tests.txt" 2>&1; tail -5 "$OUT/gpu_tests.txt"
( time python3 -m lightning_offload.train hydra.run.dir=outputs/main trainer.enable_progress_bar=false ) > "$OUT/main_job.log" 2>&1
grep -E "single_gpu_offload\`|Final metrics|^real" "$OUT/main_job.log"
python3 bench/main_job_gpu.py model=llama_1b data=random_tokens trainer.max_steps=8 trainer.limit_val_batches=0 \
  trainer.enable_progress_bar=false data.num_batches=8 "~callbacks.model_checkpoint" 2>&1 | tee "$OUT/llama_1b.log" | grep -E "RESULT|Error|error" | tail -5
