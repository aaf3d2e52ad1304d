#!/usr/bin/env bash
# Issue #31: the `auto` plan beside DeepSpeed ZeRO-3 with parameters and optimizer offloaded to pinned host memory,
# at 8B, 14.8B and 19B in R1 and R2, on smaller machines emulated by memory budgets (bench/matrix.yaml `profiles`).
# One device call per profile until `python bench/run.py --profile P --sizes 8b,14.8b,19b --methods ... --unmeasured
# --list` lists nothing; then append $OUT/results_<profile>.jsonl to bench/results_<profile>.jsonl and run
# `python bench/report.py bench/results_<profile>.jsonl --out bench/MATRIX_<profile>.md`.
# PROFILE=full measures the ZeRO-3 recipe on the whole machine (results.jsonl), where `auto` is measured already.
# Usage: PROFILE=24gb_64gib bash bench/calls/machine_profiles.sh     (also 48gb_128gib, full)
set -uo pipefail
: "${PROFILE:?name the profile: 24gb_64gib, 48gb_128gib or full}"
methods=single_gpu_offload_auto,lightning_deepspeed_stage_3_offload_pinned
if [[ $PROFILE == full ]]; then unset PROFILE; methods=lightning_deepspeed_stage_3_offload_pinned; fi
SIZES=8b,14.8b,19b METHODS=$methods UNMEASURED=1 SKIP_KNOWN=1 bash bench/gpu_matrix.sh
