#!/usr/bin/env bash
# On the GPU machine (~2-3 minutes): resume exactness of the streaming plan. First the stream backend's GPU tests
# (tiny Llama; resuming from a ModelCheckpoint is one of them), then bench/stream_resume.py at 1.5B: 4 steps in
# one run against 2 + resume from the checkpoint written after step 2, half the blocks (and the embedding, final
# norm, output layer) streamed from pinned memory, deterministic kernels; steps 3-4's losses, every final weight and
# every unit's 8-bit state must be bitwise equal (exit 1 otherwise). Disk: the 1.5B run writes two checkpoints of
# ~5.7 GiB each (bf16 weights + 8-bit state) into a folder under /tmp, removed at the end.
set -uo pipefail
source bench/device_setup.sh checkout || exit 1
export CUBLAS_WORKSPACE_CONFIG=:4096:8
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; df -h /tmp | tail -1
timeout 150 python3 -m pytest -q -m gpu tests/backends/test_stream_gpu.py -p no:cacheprovider --tb=short \
  > "$OUT/stream_gpu_tests.txt" 2>&1; tail -3 "$OUT/stream_gpu_tests.txt"
timeout 180 python3 bench/stream_resume.py --size 1.5b > "$OUT/stream_resume_1.5b.log" 2>&1
echo "stream_resume exit $?"
grep -E "^RESULT|Error" "$OUT/stream_resume_1.5b.log" | tail -2
