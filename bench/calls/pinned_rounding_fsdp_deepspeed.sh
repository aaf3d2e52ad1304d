#!/usr/bin/env bash
# One GPU call (~7 minutes): does torch's caching host allocator round the `fsdp` and `deepspeed` backends' pinned
# host buffers up to powers of two (the planner counts 40% on top of FSDP's pinned shards, and the `deepspeed` rows
# hold ~3 bytes/param more host memory than Lightning's unpinned preset), and does torch's
# `pinned_max_round_threshold_mb` allocator setting stop it? First one 600 MiB pin without and with the setting
# (the allocator's own count), then the benchmark's 1.5B R1 cells of both backends without and with it: peak host
# RSS and step time side by side, in one call.
set -uo pipefail
source bench/device_setup.sh package || exit 1
started=$SECONDS
SETTING=pinned_max_round_threshold_mb:64
pin='import torch
x = torch.empty(600 * 2**20, dtype=torch.uint8, pin_memory=True)
stats = getattr(torch.cuda, "host_memory_stats", dict)()
print(torch.__version__, {k: v / 2**20 for k, v in stats.items() if k in ("allocated_bytes.current", "reserved_bytes.current")}, "MiB")'
env -u PYTORCH_ALLOC_CONF python3 -c "$pin"
PYTORCH_ALLOC_CONF=$SETTING python3 -c "$pin"
for variant in rounded threshold; do
  setting=(env -u PYTORCH_ALLOC_CONF)
  [[ $variant == threshold ]] && setting=(env PYTORCH_ALLOC_CONF=$SETTING)
  "${setting[@]}" python3 bench/run.py --sizes 1.5b --regimes r1 \
    --methods single_gpu_offload_fsdp,single_gpu_offload_deepspeed --deadline-s 250 \
    --results "$OUT/pinned_$variant.jsonl" > "$OUT/run_$variant.out" 2>&1
  grep -E "^[0-9.]+b/" "$OUT/run_$variant.out" | cut -c1-300
done
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
for variant in ("rounded", "threshold"):
    for line in (Path(sys.argv[1]) / f"pinned_{variant}.jsonl").read_text().splitlines():
        r = json.loads(line)
        print(f"{variant:10} {r['cell']:40} {r['status']:8} s/step {r.get('step_s_median')} host RSS {r.get('peak_host_rss_gib')} GiB"
              f" (estimate {r.get('predicted_host_gib')})")
PY
echo "took $((SECONDS - started)) s"
