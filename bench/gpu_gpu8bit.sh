#!/usr/bin/env bash
# On the GPU machine, ~7 minutes: the gpu_8bit GPU tests, then R1 (micro-batch 4 x 2048) at 8B and 14.8B for
# torchtune's single-device method and single_gpu_offload(backend="gpu_8bit"); a table (with the speed-up over
# torchtune's row, target >= 1.10x) is printed last. From the repository root, with `.whl/` carried along:
#     bash bench/gpu_gpu8bit.sh
# Writes $OUT/gpu_tests.txt, $OUT/gpu8bit.jsonl (merge into bench/results.jsonl), gpu8bit.log, MATRIX_gpu8bit.md.
set -uo pipefail
OUT=${OUT:-$PWD/bench/out}
mkdir -p "$OUT"
started=$SECONDS
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/backends/test_gpu_8bit_cuda.py \
    tests/kernels/test_triton_kernel.py > "$OUT/gpu_tests.txt" 2>&1 || true
tail -3 "$OUT/gpu_tests.txt"
echo "tests done at $((SECONDS - started)) s"
# Smallest first, each method's cell in its own process; the deadline leaves time for the table.
timeout 330 python3 bench/run.py --sizes 8b,14.8b --regimes r1 --methods torchtune,single_gpu_offload_gpu_8bit \
    --timeout-s 150 --deadline-s $((400 - (SECONDS - started))) \
    --results "$OUT/gpu8bit.jsonl" --report "$OUT/MATRIX_gpu8bit.md" > "$OUT/gpu8bit_run.txt" 2>&1 || true
grep -h "blocks recompute" "$OUT/gpu8bit.log" 2>/dev/null | sort | uniq -c || true
echo "benchmark done at $((SECONDS - started)) s"
python3 - "$OUT/gpu8bit.jsonl" <<'PY' || true
import json, sys
rows = {}
for line in open(sys.argv[1]):
    record = json.loads(line)
    if record.get("kind") == "cell":
        rows[record["cell"]] = record
print("| cell | status | s/step (median) | tokens/s | model TFLOP/s | peak GPU (torch) GiB | vs torchtune |")
print("|---|---|---|---|---|---|---|")
for cell, r in rows.items():
    size = cell.split("/")[0]
    base = rows.get(f"{size}/torchtune/r1", {})
    ratio = (r.get("tokens_per_s") or 0) / base["tokens_per_s"] if base.get("tokens_per_s") else float("nan")
    print(f"| {cell} | {r.get('status')} {r.get('cause') or ''} | {r.get('step_s_median', '')} | "
          f"{r.get('tokens_per_s', '')} | {r.get('model_tflops', '')} | {r.get('peak_gpu_torch_gib', '')} | {ratio:.2f}x |")
PY
