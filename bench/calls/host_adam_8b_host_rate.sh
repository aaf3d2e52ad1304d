#!/usr/bin/env bash
# One GPU call (~4 minutes): why the host AdamW inside an 8B R1 `host_adam` step runs at ~2 Gparam/s where the
# planner's probe reads 4-5.7 on the same machine - the planner's plan as it is, with 16M-parameter host AdamW
# calls instead of 2M (fewer calls, fewer send-backs), and with all 16 cores (default: all but one).
set -uo pipefail
source bench/device_setup.sh package || exit 1
started=$SECONDS
source bench/phases.sh
phases 110 hostadam_8b --size 8b
phases 110 hostadam_8b_chunk16m --size 8b --chunk-numel 16000000
phases 110 hostadam_8b_16_threads --size 8b --host-threads 16
python3 -c "from lightning_offload.planner.cost import probe; import torch; print('probe', probe(torch.device('cuda')))"
echo "took $((SECONDS - started)) s"
