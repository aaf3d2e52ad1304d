#!/usr/bin/env bash
# One GPU call: the conformance modules under gpu_8bit, host_adam, stream and deepspeed on the GPU, against a plain
# bf16 GPU run (tests/conformance/test_gpu.py); the log is $OUT/gpu_tests.log.
set -uo pipefail
TESTS=tests/conformance/test_gpu.py DEADLINE_S=540 bash bench/gpu_tests.sh
