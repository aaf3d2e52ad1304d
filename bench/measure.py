"""What every method's cell measures the same way: optimizer-step times, losses, and GPU memory peaks."""

from __future__ import annotations

import statistics
import sys
import time
from importlib import metadata

import torch

# The packages whose versions decide what a row means; recorded with every cell.
VERSIONED = ("torch", "lightning", "transformers", "deepspeed", "bitsandbytes", "torchao", "lightning_offload")


class StepClock:
    """Times whole optimizer steps (all micro-batches of an accumulation) between two device synchronisations."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self.losses: list[float] = []
        self.planned: dict[str, object] = {}
        """What the planner predicted for the plan that ran (lightning_offload's rows), beside what was measured."""
        self._started = 0.0

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._synchronize()
        self._started = time.perf_counter()

    def stop(self, micro_batch_losses: list[torch.Tensor]) -> None:
        self._synchronize()
        self.times.append(time.perf_counter() - self._started)
        # Read after the clock stopped: `.item()` would otherwise add a sync per micro-batch to the step.
        self.losses.append(round(torch.stack([loss.float() for loss in micro_batch_losses]).mean().item(), 4))
        # A heartbeat in the cell's log: a hung or killed cell shows how far it got.
        print(f"step {len(self.times)}: {self.times[-1]:.3f} s, loss {self.losses[-1]}", file=sys.stderr, flush=True)


def summarise(times: list[float], losses: list[float], warmup: int, tokens_per_step: int,
              matmul_params: int) -> dict[str, float | None]:
    """Steady-state figures of a run: the first `warmup` steps (allocation, autotuning, JIT) are left out.

    The median is the typical step; the mean shows engines that stall every few steps (ZenFlow's CPU update).
    Model TFLOP/s = 6 x (params - input embedding) x tokens / s, without recompute or attention FLOPs.
    """
    steady = times[warmup:] or times
    median = statistics.median(steady)
    return {
        "step_s_median": round(median, 4),
        "step_s_mean": round(statistics.fmean(steady), 4),
        "tokens_per_s": round(tokens_per_step / median, 1),
        "model_tflops": round(6 * matmul_params * tokens_per_step / median / 1e12, 1),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
    }


def versions() -> dict[str, str]:
    found = {}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU {platform.processor() or platform.machine()}"
