#!/usr/bin/env bash
# One GPU call (~5 minutes): the telemetry GPU test (pinned memory read at the last batch), then 8B R1 host_adam's
# planned run with the weights cast on the GPU (the default since this call) beside the same plan casting them on
# the host. Run on 2026-12-05 before the default changed, as methods `..._host_adam_cast_on_device` and
# `..._host_adam`; these are their names now.
set -uo pipefail
source bench/device_setup.sh package || exit 1
started=$SECONDS
timeout 120 python3 -m pytest -q -m gpu tests/test_telemetry.py -p no:cacheprovider --tb=short 2>&1 | tail -3
python3 bench/run.py --sizes 8b --regimes r1 --steps 6 --warmup 2 --timeout-s 150 \
  --methods single_gpu_offload_host_adam,single_gpu_offload_host_adam_cast_on_host \
  --results "$OUT/results.jsonl" --deadline-s $((400 - (SECONDS - started))) 2>&1 | tail -4
echo "took $((SECONDS - started)) s"
