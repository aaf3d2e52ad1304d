#!/usr/bin/env bash
# The benchmark's first GPU session (issue #9), well under 9 minutes: the probe, then R1 at 1.5B for the plain
# loop, torchtune's method, torchao's CPU offload, Lightning "auto" and single_gpu_offload(deepspeed); the markdown
# table is printed last. From the repository root on the device machine (with `.whl/` carried along):
#     bash bench/gpu_session.sh
# Writes $OUT/results.jsonl (merge it into bench/results.jsonl), results.log, MATRIX.md and MATRIX.png.
set -euo pipefail
OUT=${OUT:-$PWD/bench/out}
mkdir -p "$OUT"
started=$SECONDS
if compgen -G ".whl/*.whl" >/dev/null; then  # deepspeed, bitsandbytes, torchao, hydra: not preinstalled there
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import psutil, yaml" || { echo "bench/run.py needs psutil and PyYAML: add their wheels to .whl/"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "setup took $((SECONDS - started)) s"
# The deadline stops starting cells in time for the report; the probe builds DeepSpeed's CPU Adam for later cells.
python3 bench/run.py --probe --sizes 1.5b --regimes r1 \
    --methods plain,torchtune,torchao_offload,lightning_auto,single_gpu_offload_deepspeed \
    --timeout-s 200 --deadline-s $((480 - (SECONDS - started))) \
    --results "$OUT/results.jsonl" --report "$OUT/MATRIX.md"
echo "session took $((SECONDS - started)) s"
cat "$OUT/MATRIX.md"
