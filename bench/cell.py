"""One cell of the matrix in this process: trains `--method` on `--size` for a regime's steps, prints `RESULT {json}`.

    python -m bench.cell --size 1.5b --method plain --regime r1

bench/run.py starts one of these per cell (so memory peaks and crashes are the cell's own); run alone, it is the
quickest way to look at one method. Every exception, an OOM included, is reported in the RESULT line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import traceback
from dataclasses import replace
from pathlib import Path


import psutil
import torch

from bench import GIB, RESULT_PREFIX, PredictedTimeout
from bench.matrix import DEFAULT_CONFIG, add_override_arguments, load_config, overrides_from, skip_reason
from bench.measure import device_name, summarise, versions
from lightning_offload.telemetry import GpuMemorySampler
from bench.models import SIZES
from bench.runners import RUNNERS, Cell


def measure_cell(method_name: str, size: str, regime_name: str, device: str, config_path: Path,
                 regime_overrides: dict[str, int], deadline: float | None = None, profile: str | None = None) -> dict:
    config = load_config(config_path)
    machine = config.profiles[profile] if profile else None
    method = config.methods[method_name]
    regime = replace(config.regimes[regime_name], **regime_overrides)
    skipped = skip_reason(method, regime, device)
    if skipped:
        return {"ok": False, "skipped": skipped}
    result: dict = {"versions": versions()}
    with GpuMemorySampler() as gpu:
        try:
            result["device"] = device_name(torch.device(device))
            if machine is not None and device == "cuda":
                # Every method's allocator gets the smaller card's memory; our planner reads the same cap.
                total = torch.cuda.mem_get_info()[1]
                torch.cuda.set_per_process_memory_fraction(min(1.0, machine.gpu_memory_gib * GIB / total))
            host_memory_gib = machine.host_memory_gib if machine is not None else None
            cell = Cell(size, regime, torch.device(device), deadline, host_memory_gib=host_memory_gib)
            clock = RUNNERS[method.runner](cell, **method.options)
            result.update(ok=True, step_times=[round(t, 4) for t in clock.times], losses=clock.losses,
                          **summarise(clock.times, clock.losses, regime.warmup, regime.tokens_per_step,
                                      SIZES[size].matmul_params), **clock.planned)
        except BaseException as error:  # OOMs and kills are data
            result.update(ok=False, error=f"{type(error).__name__}: {str(error)[:500]}")
            if isinstance(error, PredictedTimeout):  # the refused plan, as a measured cell records the plan it ran
                result.update(error.planned)
            traceback.print_exc()
    if torch.cuda.is_initialized():
        result["peak_gpu_torch_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        result["peak_gpu_device_gib"] = round(gpu.peak_bytes / GIB, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", required=True, choices=list(SIZES))
    parser.add_argument("--method", required=True)
    parser.add_argument("--regime", default="r1")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--time-limit-s", type=float,
                        help="the limit bench/run.py kills this cell at; lightning_offload's rows stop at train start "
                             "when the planner predicts that their steps cannot finish before it")
    parser.add_argument("--profile", help="the smaller machine to run as (bench/matrix.yaml `profiles`)")
    add_override_arguments(parser)
    args = parser.parse_args()
    # Counted from the process start, as bench/run.py counts it: the imports and the model build spend it too.
    deadline = psutil.Process().create_time() + args.time_limit_s if args.time_limit_s else None
    result = measure_cell(args.method, args.size, args.regime, args.device, args.config, overrides_from(args),
                          deadline, args.profile)
    result["peak_rss_self_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    # Leave without interpreter shutdown: engines' worker threads and process groups can hang it, which would turn
    # a finished cell into a timeout.
    os._exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
