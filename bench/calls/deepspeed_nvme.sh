#!/usr/bin/env bash
# One GPU call (~8 minutes): the `deepspeed` backend at 3.6B R1 with its bf16 weights on NVMe (ZeRO-Infinity) beside
# its CPU offload, the disk probe the planner reads, and the planner's NVMe table for 3.6B. All state on disk
# (18 bytes/param) does not fit this machine's 64 GiB disk at 3.6B: the table says by how much.
# The image lacks libaio, which DeepSpeed's async I/O op builds against: carry Debian's packages in .debs/
# (git-ignored), fetched on a Debian/Ubuntu x86-64 machine with
#     mkdir -p .debs && (cd .debs && apt-get download libaio1 libaio-dev)
# and run with .debs (and .whl) carried:  bash bench/calls/deepspeed_nvme.sh
set -uo pipefail
source bench/device_setup.sh package || exit 1
started=$SECONDS
# libaio unpacked beside the system (not into /): the op's compile check reads CFLAGS/LDFLAGS, gcc reads CPATH and
# LIBRARY_PATH when torch's JIT builds it, and the loader finds libaio.so.1 through LD_LIBRARY_PATH.
AIO=/tmp/libaio; mkdir -p "$AIO"
for deb in .debs/*.deb; do dpkg -x "$deb" "$AIO" || exit 1; done
AIO_LIB=$AIO/usr/lib/x86_64-linux-gnu
export CFLAGS="-I$AIO/usr/include" LDFLAGS="-L$AIO_LIB" CPATH="$AIO/usr/include" LIBRARY_PATH="$AIO_LIB" \
  LD_LIBRARY_PATH="$AIO_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export BENCH_NVME_PATH=/tmp/nvme_swap; mkdir -p "$BENCH_NVME_PATH"
df -h "$BENCH_NVME_PATH" | tail -1
# Both DeepSpeed ops built up front, without a time limit: a build killed mid-way leaves a lock that hangs later ones.
python3 - <<'PY' 2>&1 | grep -E "compatible|built|Error" | tail -4
import time
from deepspeed.accelerator import get_accelerator
for name in ("AsyncIOBuilder", "CPUAdamBuilder"):
    builder = get_accelerator().create_op_builder(name)
    print(name, "compatible:", builder.is_compatible(verbose=True))
    start = time.time(); builder.load(); print(name, f"built in {time.time() - start:.0f} s")
PY
echo "ops ready at $((SECONDS - started)) s"
python3 - "$BENCH_NVME_PATH" <<'PY'
import sys
from lightning_offload.planner import load_or_probe_disk
print("disk:", load_or_probe_disk(sys.argv[1]).describe())
PY
python3 -m lightning_offload plan model=llama_3b data=random_tokens data.batch_size=4 data.seq_len=2048 \
  backend=deepspeed nvme_path="$BENCH_NVME_PATH" rows=8 2>&1 | tail -16
LOGS=/tmp/work/logs; mkdir -p "$LOGS"; RESULTS="$LOGS/cells.jsonl"
# Cells stop starting at the deadline (the ops are built, so no build is cut short); each has 200 s.
remaining=$((480 - (SECONDS - started)))
if (( remaining > 150 )); then
  python3 bench/run.py --sizes 3.6b --regimes r1 --steps 4 --warmup 1 --timeout-s 200 --deadline-s "$remaining" \
    --methods single_gpu_offload_deepspeed,single_gpu_offload_deepspeed_nvme_parameters \
    --results "$RESULTS" --log "$LOGS/cells.log" > "$LOGS/run.txt" 2>&1
fi
grep -E "^[0-9.]+b/" "$LOGS/run.txt" | cut -c1-300
du -sh "$BENCH_NVME_PATH" 2>/dev/null
tar czf "$OUT/logs.tgz" -C /tmp/work logs
python3 - "$RESULTS" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['cell']:60} {r['status']:8} s/step {r.get('step_s_median')} tokens/s {r.get('tokens_per_s')} "
          f"host RSS {r.get('peak_host_rss_gib')} GiB (estimate {r.get('predicted_host_gib')}) "
          f"GPU {r.get('peak_gpu_device_gib')} GiB")
PY
echo "took $((SECONDS - started)) s"
