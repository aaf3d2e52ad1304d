#!/usr/bin/env bash
# Issue #31: the `auto` plan beside DeepSpeed ZeRO-3 with parameters and optimizer offloaded to pinned host memory,
# at 8B, 14.8B and 19B in R1 and R2, on smaller machines emulated by memory budgets (bench/matrix.yaml `profiles`):
# every method's allocator is capped at the profile's GPU memory, our rows plan within its host memory, and a cell
# whose process tree holds more is killed there. Each cell records its peaks (`peak_gpu_device_gib`,
# `peak_gpu_torch_gib`, `peak_host_rss_gib`) beside the profile's (`profile_gpu_gib`, `profile_host_gib`).
# One profile is two device calls of at most 9 minutes each, by the cells' wall times on the full machine: ours
# 48-68 s per cell in R1 and 87-126 s in R2; ZeRO-3 killed for host memory within 150 s at 8B, which answers its
# larger sizes in the same call (R2 does not apply to it: it cannot accumulate):
#     PROFILE=24gb_64gib REGIME=r1 bash bench/calls/machine_profiles.sh     # then REGIME=r2
#     PROFILE=48gb_128gib REGIME=r1 bash bench/calls/machine_profiles.sh    # then REGIME=r2
#     PROFILE=full bash bench/calls/machine_profiles.sh     # ZeRO-3 on the whole machine; ours is measured there
# A call the deadline cuts records the rest as not run: the same command again measures them. Then append
# $OUT/results_<profile>.jsonl to bench/results_<profile>.jsonl (full: $OUT/results.jsonl to bench/results.jsonl) and
# run `python bench/report.py bench/results_<profile>.jsonl --out bench/MATRIX_<profile>.md`.
set -uo pipefail
: "${PROFILE:?name the profile: 24gb_64gib, 48gb_128gib or full}"
ours=single_gpu_offload_auto zero3=lightning_deepspeed_stage_3_offload_pinned
if [[ $PROFILE == full ]]; then
  unset PROFILE
  methods=$zero3 regime=r1
else
  case ${REGIME:-} in
    r1) methods=$ours,$zero3 regime=r1 ;;
    r2) methods=$ours regime=r2 ;;
    *) echo "name the regime: REGIME=r1 or r2" >&2; exit 2 ;;
  esac
fi
SIZES=8b,14.8b,19b METHODS=$methods REGIMES=$regime UNMEASURED=1 SKIP_KNOWN=1 bash bench/gpu_matrix.sh
