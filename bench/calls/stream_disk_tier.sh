#!/usr/bin/env bash
# One GPU call (under 10 minutes), issue "The NVMe tier", part 2: disk as the streaming plan's third tier.
#   - the GPU test: state on disk trains bit for bit like state in host memory (CUDA events, pinned buffers, aio);
#   - the ~49.5B Llama shape (hidden 6144, 88 layers, intermediate 24576, 48/8 heads, vocab 152064), 5 steps of
#     8,192 tokens, the GPU, host memory (within 112 GiB) and the disk all holding state; the phase timing and the
#     seconds the host waited for the disk ('disk wait') say what bounds it. R2 (8 micro-batches per step) cannot
#     run at this size: the streaming plan keeps every bf16 gradient on the GPU between micro-batches (99 GB);
#   - 19B in R2 (65,536 tokens per step) within `max_host_memory_gib=48` with state on disk, then RAM-only (no
#     budget), 3 steps each (the median is the last step's time).
# The planner expects (H100, disk at 1.9/1.5 GB/s): 49.5B 40 blocks resident, 41 blocks' state on disk (42.6 GiB),
# ~57 s/step against 6.5 s of compute (disk-bound); 19B R2 at 48 GiB 27 blocks' state on disk (20.2 GiB), ~44 s/step
# against ~19 s RAM-only. 49.5B runs first; a run that cannot finish in what is left of the 590 s is skipped and
# named: run the rest with `bash bench/calls/stream_disk_tier.sh 19b` (or `49.5b`) in a second call.
# The image lacks libaio, which DeepSpeed's async I/O op builds against: carry Debian's packages in .debs/ (git-ignored;
# see bench/calls/deepspeed_nvme.sh), and run with .debs (and .whl) carried:  bash bench/calls/stream_disk_tier.sh
set -uo pipefail
sizes=${1:-all}  # all, 49.5b or 19b
source bench/device_setup.sh checkout || exit 1
started=$SECONDS
AIO=/tmp/libaio; mkdir -p "$AIO"
for deb in .debs/*.deb; do dpkg -x "$deb" "$AIO" || exit 1; done
AIO_LIB=$AIO/usr/lib/x86_64-linux-gnu
export CFLAGS="-I$AIO/usr/include" LDFLAGS="-L$AIO_LIB" CPATH="$AIO/usr/include" LIBRARY_PATH="$AIO_LIB" \
  LD_LIBRARY_PATH="$AIO_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
NVME=/tmp/nvme_stream; mkdir -p "$NVME"
df -h "$NVME" | tail -1
# The op built up front, without a time limit: a build killed mid-way leaves a lock that hangs later ones.
python3 - <<'PY' 2>&1 | grep -E "compatible|built|Error" | tail -3
import time
from deepspeed.accelerator import get_accelerator
builder = get_accelerator().create_op_builder("AsyncIOBuilder")
print("AsyncIOBuilder compatible:", builder.is_compatible(verbose=True))
start = time.time(); builder.load(); print(f"AsyncIOBuilder built in {time.time() - start:.0f} s")
PY
python3 - "$NVME" <<'PY'
import sys
from lightning_offload.planner import load_or_probe_disk
print("disk:", load_or_probe_disk(sys.argv[1]).describe())
PY
echo "op and probe ready at $((SECONDS - started)) s"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/backends/test_stream_gpu.py -k disk 2>&1 | tail -2
step() {  # minimum seconds left to start, name, then stream_step.py arguments
  local needs=$1 name=$2; shift 2
  local left=$((590 - (SECONDS - started)))
  if (( left < needs )); then echo "$name skipped: $left s left"; return; fi
  timeout "$left" python3 bench/stream_step.py "$@" > "$OUT/stream_$name.log" 2>&1
  grep -E "^RESULT|Error|error:" "$OUT/stream_$name.log" | tail -2 | cut -c1-1200
  rm -rf "${NVME:?}"/lightning_offload-stream-*  # a run cut short leaves its state files
  echo "$name took $((SECONDS - started)) s in all"
}
if [[ $sizes != 19b ]]; then
  step 360 49.5b_disk --size 49.5b --steps 5 --nvme-path "$NVME" --host-gib 112 --no-planner-check
fi
if [[ $sizes != 49.5b ]]; then
  step 180 19b_r2_disk_48gib --size 19b --steps 3 --accumulate 8 --nvme-path "$NVME" --host-gib 48 --no-planner-check
  step 110 19b_r2_ram --size 19b --steps 3 --accumulate 8 --no-planner-check
fi
echo "took $((SECONDS - started)) s"
