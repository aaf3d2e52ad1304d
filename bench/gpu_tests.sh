#!/usr/bin/env bash
# One GPU call: every test marked `gpu` (they skip on the CPU), against the checkout, within the call's limit.
# Usage: [TESTS="tests/test_losses.py tests/backends"] [DEADLINE_S=560] bash bench/gpu_tests.sh
set -uo pipefail
source bench/device_setup.sh checkout || exit 1
timeout "${DEADLINE_S:-560}" python3 -m pytest -q -m gpu -p no:cacheprovider --durations=15 ${TESTS:-tests} \
  > "$OUT/gpu_tests.log" 2>&1
echo "pytest exit $?"
grep -E "passed|failed|error|FAILED|ERROR" "$OUT/gpu_tests.log" | tail -25 | cut -c1-400
