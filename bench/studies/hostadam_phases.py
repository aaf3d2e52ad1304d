"""Where one `host_adam` step's time goes: GPU compute, gradient copies out, weight copies in, host AdamW.
With `--backend gpu_8bit`: GPU compute and the fused 8-bit AdamW launches that run inside backward.

    python -m bench.studies.hostadam_phases --size 3.6b                 # R1: 4 x 2048 tokens, no accumulation
    python -m bench.studies.hostadam_phases --size 3.6b --accumulate 8  # R2
    python -m bench.studies.hostadam_phases --size 3.6b --gpu-state-blocks 0 --host-threads 8   # every state on the host
    python -m bench.studies.hostadam_phases --size tiny --device cpu --seq 64   # a smoke test
    python -m bench.studies.hostadam_phases --size 8b --backend gpu_8bit        # the update's share of a gpu_8bit step

Profiles (torch.profiler) from the start of one optimizer step to the start of the next, so the host updates that
run into the next forward are inside the window, and prints per phase its busy time and when it starts and ends
relative to the window: overlap is shown, not assumed. The Chrome trace is written beside `--out`. As in the
benchmark's host_adam rows, the planner chooses checkpointing (and, unless `--gpu-state-blocks` pins it, how many
front blocks keep their optimizer state on the GPU) and the loss never materialises the full logits.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


import lightning as L
import torch
from torch.utils.data import DataLoader

from bench.models import SIZES
from bench.runners import LlamaModule, _RandomTokens

PROFILED_STEP = 2  # steps 0 and 1 warm up (allocation, autotuning)


def _union_s(intervals: list[tuple[float, float]]) -> float:
    busy, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy / 1e6


UPDATE_KERNEL = "adamw8bit"  # lightning_offload.kernels' Triton kernel (`_adamw8bit_kernel`)


def phase(event: Any) -> str | None:
    name = event.name
    if event.device_type == torch.autograd.DeviceType.CUDA and UPDATE_KERNEL in name:
        return "8-bit AdamW update"
    if name.startswith("Memcpy DtoH"):
        return "D2H (gradients out)"
    if name.startswith("Memcpy HtoD"):
        return "H2D (weights in)"
    if event.device_type == torch.autograd.DeviceType.CUDA and not name.startswith("Memset"):
        return "GPU compute"
    return None


class ProfileOneStep(L.Callback):
    def __init__(self, accumulate: int, trace: Path) -> None:
        self.accumulate, self.trace = accumulate, trace
        self.profiler: torch.profiler.profile | None = None
        self.engine: Any = None

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx % self.accumulate:
            return
        step = batch_idx // self.accumulate
        if step == PROFILED_STEP:
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
            self.started = time.perf_counter()
            # The profiler does not see threads started before it: the engine's worker reports its own times.
            self.timeline = []
            self.engine = getattr(trainer.strategy.backend, "engine", None)  # host_adam's; gpu_8bit has none
            if self.engine is not None:
                self.engine.timeline = self.timeline
        elif step == PROFILED_STEP + 1 and self.profiler is not None:
            self.wall_s = time.perf_counter() - self.started
            if self.engine is not None:
                self.engine.timeline = None
            self.profiler.__exit__(None, None, None)
            self.profiler.export_chrome_trace(str(self.trace))
            trainer.should_stop = True


def host_spans(timeline: list[tuple[str, int, float]], started: float) -> list[tuple[float, float]]:
    """(start, end) in microseconds from the window's start of each bucket's update, cast and copy back."""
    begun = {index: t for what, index, t in timeline if what == "update"}
    return [((begun[index] - started) * 1e6, (t - started) * 1e6)
            for what, index, t in timeline if what == "done" and index in begun]


def summarise(profiler: torch.profiler.profile, wall_s: float, host: list[tuple[float, float]]) -> dict[str, Any]:
    events = [e for e in profiler.events() if phase(e) is not None]
    origin = min(e.time_range.start for e in profiler.events())
    rows: dict[str, Any] = {"step wall": {"busy_s": round(wall_s, 3)}}
    for name in ("GPU compute", "8-bit AdamW update", "D2H (gradients out)", "host AdamW + cast", "H2D (weights in)"):
        spans = [(e.time_range.start - origin, e.time_range.end - origin) for e in events if phase(e) == name]
        spans = host if name == "host AdamW + cast" else spans
        if spans:
            rows[name] = {"busy_s": round(_union_s(spans), 3),
                          "from_s": round(min(s for s, _ in spans) / 1e6, 3),
                          "to_s": round(max(t for _, t in spans) / 1e6, 3)}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="3.6b", choices=list(SIZES))
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--backend", default="host_adam", choices=["host_adam", "gpu_8bit"])
    parser.add_argument("--gpu-state-blocks", type=int, help="front blocks updated on the GPU (default: the planner's)")
    parser.add_argument("--host-threads", type=int, help="threads of the host AdamW (default: all cores but one)")
    parser.add_argument("--cast-on-host", action="store_true",
                        help="cast the weights to bf16 on the host (default: back as fp32, cast on the GPU)")
    parser.add_argument("--chunk-numel", type=int, help="parameters per host AdamW call (default: the backend's)")
    parser.add_argument("--out", type=Path, default=Path("hostadam_phases.json"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)

    import lightning_offload

    steps = PROFILED_STEP + 2
    if args.backend == "host_adam":
        strategy = lightning_offload.SingleGPUOffloadStrategy(
            backend="host_adam", gpu_state_blocks=args.gpu_state_blocks, host_threads=args.host_threads,
            cast_on_device=not args.cast_on_host,
            **({"chunk_numel": args.chunk_numel} if args.chunk_numel else {}))
    else:
        strategy = lightning_offload.SingleGPUOffloadStrategy(backend="gpu_8bit")
    callback = ProfileOneStep(args.accumulate, args.out.with_suffix(".trace.json"))
    trainer = L.Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, precision="bf16-mixed",
                        strategy=strategy,
                        max_steps=steps, accumulate_grad_batches=args.accumulate, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[callback])
    tokens = _RandomTokens(steps * args.accumulate * args.micro_batch, args.seq, SIZES[args.size].vocab)
    trainer.fit(LlamaModule(args.size, "by_strategy", "adamw", loss="chunked"),
                DataLoader(tokens, batch_size=args.micro_batch))
    rows = summarise(callback.profiler, callback.wall_s, host_spans(callback.timeline, callback.started))
    engine = callback.engine
    params = sum(engine.numels[:engine.host_count]) if engine is not None else 0
    on_gpu = engine.device_total if engine is not None else sum(p.numel() for p in trainer.lightning_module.parameters())
    adam = rows.get("host AdamW + cast", {}).get("busy_s")
    report = trainer.strategy.plan_report
    result = {"size": args.size, "accumulate": args.accumulate, "phases": rows,
              "plan": str(report.chosen.plan) if report and report.chosen else None,
              "predicted_step_s": round(report.chosen.step_time_s, 3) if report and report.chosen else None,
              "backend": args.backend, "params_on_host": params, "params_on_gpu": on_gpu,
              "host_adamw_Gparam_per_s": round(params / adam / 1e9, 2) if adam else None}
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{args.backend} one step, {args.size}, {args.micro_batch}x{args.seq} tokens x {args.accumulate} "
          f"(seconds from the step's start; busy = union of the phase's intervals)")
    print(f"plan: {result['plan']} (predicted {result['predicted_step_s']} s/step); parameters updated on the "
          f"host {params / 1e9:.2f}B, on the GPU {on_gpu / 1e9:.2f}B")
    print(f"{'phase':<22}{'busy_s':>8}{'from_s':>8}{'to_s':>8}")
    for name, row in rows.items():
        print(f"{name:<22}{row['busy_s']:>8}{row.get('from_s', ''):>8}{row.get('to_s', ''):>8}")
    print(f"host AdamW rate: {result['host_adamw_Gparam_per_s']} Gparam/s")


if __name__ == "__main__":
    main()
