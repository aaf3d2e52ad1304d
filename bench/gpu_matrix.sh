#!/usr/bin/env bash
# One GPU call of the benchmark matrix (issue "The benchmark"): the cells asked for, until the call's deadline (a
# cell is started only if the time left fits its estimate from the measured cells; one the deadline cuts is recorded
# as not run). Results go to $OUT/results.jsonl: append them to bench/results.jsonl here, then
# `python bench/report.py bench/results.jsonl`.
# Usage: SIZES=3.6b [REGIMES=r1] [METHODS=plain,torchtune,...] [PROBE=1] [DEADLINE_S=540] [SKIP_KNOWN=1] bash bench/gpu_matrix.sh
#        UNMEASURED=1 [SIZES=...] [REGIMES=r1,r2] [METHODS=...] ... bash bench/gpu_matrix.sh
# SKIP_KNOWN=1 records the cells that a failure (memory or timeout) in bench/results.jsonl already answers instead of running them.
# UNMEASURED=1 runs only the cells bench/results.jsonl does not answer yet (every size and regime unless named);
# `python bench/run.py --unmeasured --skip-known-failures --list` shows them here first, with their estimates.
# PROFILE=24gb_64gib runs the cells as a smaller machine (bench/matrix.yaml `profiles`): results, SKIP_KNOWN and
# UNMEASURED use results_<profile>.jsonl in place of results.jsonl.
set -uo pipefail
source bench/device_setup.sh package || exit 1
started=$SECONDS
if [[ -n ${UNMEASURED:-} ]]; then regimes=${REGIMES:-r1,r2}; else regimes=${REGIMES:-r1}; : "${SIZES:?name the sizes, e.g. SIZES=3.6b}"; fi
results=results${PROFILE:+_$PROFILE}.jsonl
python3 bench/run.py ${PROBE:+--probe} ${SIZES:+--sizes "$SIZES"} --regimes "$regimes" ${METHODS:+--methods "$METHODS"} \
  ${PROFILE:+--profile "$PROFILE"} ${SKIP_KNOWN:+--skip-known-failures "bench/$results"} \
  ${UNMEASURED:+--unmeasured "bench/$results"} \
  --deadline-s $(( ${DEADLINE_S:-540} - (SECONDS - started) )) --results "$OUT/$results" > "$OUT/run.out" 2>&1
grep -E "^[0-9.]+b/" "$OUT/run.out" | cut -c1-300
echo "took $((SECONDS - started)) s"
