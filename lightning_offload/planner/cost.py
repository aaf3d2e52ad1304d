"""The cost model: a plan's step time from the machine's measured ceilings.

A short probe (a few seconds) measures what bounds every plan - the matmul rate, PCIe bandwidth each way and both
ways at once, and the CPU's AdamW rate - and caches it per machine, so planning a run costs nothing the second time.
Each plan's step is then the sum of the phases that cannot overlap: compute (with recompute), the PCIe traffic the
engine leaves exposed, and the optimizer work that does not hide under backward; compute is costed here, the rest by
each backend's spec (`backends/spec.py`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lightning_offload.backends import registry
from lightning_offload.planner.cache import cache_root
from lightning_offload.planner.measure import ModelStats
from lightning_offload.planner.terms import (
    BACKWARD_SHARE,
    GPU_UPDATE_RATE,
    Plan,
    StepInputs,
    StepTime,
    checkpointed_blocks,
)

if TYPE_CHECKING:
    from lightning_offload.planner.disk import Disk

__all__ = ["BACKWARD_SHARE", "GPU_UPDATE_RATE", "Ceilings", "StepTime", "estimate_step_time", "load_or_probe", "probe",
           "training_flops"]

# Share of the dense bf16 matmul rate a decoder training step reaches (attention, norms, launches included) at
# block width 4096, scaled by (width / 4096) ** 0.6 (bench/RESULTS.md, "Calibration constants").
ACHIEVED_MATMUL_FRACTION = 0.50
REFERENCE_WIDTH = 4096
# On a CPU device the BLAS runs a model of the probe's width (512) near the probed 512^3 fp32 rate and narrower
# ones lower, unlike a GPU (bench/RESULTS.md, "Calibration constants").
CPU_MATMUL_SHARE = 0.80
CPU_REFERENCE_WIDTH = 512
# A compiled decoder layer's forward, recompute and backward against the eager layer's: Inductor fuses the
# elementwise work (RMSNorm, rotary embeddings, SiLU x up, casts) around the GEMMs
# (bench/RESULTS.md, "Calibration constants").
COMPILED_BLOCK_TIME = 0.87
# Part of the cache's file name: a machine probed by an earlier `probe` is probed again (version 2: the CPU AdamW
# rate over 2 GiB, not 256 MiB read from the CPU's cache; 3: whether the ceilings are a GPU's).
PROBE_VERSION = 3


@dataclass(frozen=True, kw_only=True)
class Ceilings:
    """What bounds a training step on one machine. Defaults: the project's reference GPU machine
    (bench/RESULTS.md, "Calibration constants")."""

    device: str = "NVIDIA H100 80GB HBM3"
    matmul_tflops: float = 773.0
    h2d_gbps: float = 46.7
    d2h_gbps: float = 55.0
    duplex_gbps: float = 78.5
    cpu_adamw_gparams: float = 3.9
    on_gpu: bool = True

    def achieved_flops(self, width: int = REFERENCE_WIDTH) -> float:
        if not self.on_gpu:
            by_width = min(1.0, width / CPU_REFERENCE_WIDTH) ** 0.4 if width else 1.0
            return self.matmul_tflops * 1e12 * CPU_MATMUL_SHARE * by_width
        by_width = (width / REFERENCE_WIDTH) ** 0.6 if width else 1.0
        return self.matmul_tflops * 1e12 * ACHIEVED_MATMUL_FRACTION * by_width


def training_flops(stats: ModelStats, plan: Plan) -> float:
    """FLOPs of one micro-batch: 6 x N x tokens, plus a forward again for every recomputed block."""
    if not stats.tokens:
        return 0.0
    recomputed = checkpointed_blocks(stats, plan) / stats.blocks if stats.blocks else 0.0
    return (6 + 2 * recomputed) * stats.compute_parameters * stats.tokens


def estimate_step_time(stats: ModelStats, plan: Plan, ceilings: Ceilings, *, accumulate: int = 1,
                       disk: Disk | None = None) -> StepTime:
    """Seconds per step by phase; `disk` (its probed bandwidths) for the plans that keep state on it."""
    compute = accumulate * training_flops(stats, plan) / ceilings.achieved_flops(stats.width)
    if stats.compiled_blocks:
        compute *= COMPILED_BLOCK_TIME
    h2d, d2h, duplex = (g * 1e9 for g in (ceilings.h2d_gbps, ceilings.d2h_gbps, ceilings.duplex_gbps))
    passes = 2 + (1 if checkpointed_blocks(stats, plan) else 0)  # forward, backward, recompute
    # `offload` checkpointing copies saved tensors out on a side stream under forward and back, a block ahead,
    # under backward (activation_offload.py): only the copy time beyond the compute it runs under is exposed.
    saved = stats.blocks * stats.activation_bytes_per_block if plan.checkpointing == "offload" else 0
    offload = accumulate * (saved / d2h + saved / h2d)
    offload_exposed = (max(0.0, accumulate * saved / d2h - (1 - BACKWARD_SHARE) * compute)
                       + max(0.0, accumulate * saved / h2d - BACKWARD_SHARE * compute))
    return registry.spec(plan.backend).step_time(StepInputs(
        stats, plan, accumulate, disk, compute, h2d, d2h, duplex, ceilings.cpu_adamw_gparams * 1e9, passes, offload,
        offload_exposed))


def _cache_path(device: torch.device) -> Path:
    root = cache_root()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    key = "".join(c if c.isalnum() else "-" for c in f"{platform.node()}-{name}-{os.cpu_count()}")
    return root / f"ceilings-v{PROBE_VERSION}-{key}.json"


def _positive_rates(ceilings: Ceilings) -> bool:
    rates = [value for value in asdict(ceilings).values() if not isinstance(value, (str, bool))]
    return all(isinstance(value, (int, float)) and value > 0 for value in rates)


def load_or_probe(device: torch.device) -> Ceilings:
    """This machine's ceilings: from the cache when this machine was probed before, else probed now and cached."""
    path = _cache_path(device)
    if path.exists():
        try:
            cached = Ceilings(**json.loads(path.read_text()))
        except (TypeError, ValueError):
            cached = None
        if cached is not None and _positive_rates(cached):
            return cached
        # A damaged cache (a zero or negative rate would divide by zero or plan backwards) is probed again.
    # The probe draws random tensors: the run's random streams (weight init, dropout) must not see it happen.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        ceilings = probe(device)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(ceilings), indent=1))
        temporary.replace(path)
    except OSError:
        pass  # an unwritable cache only costs the next run a probe
    return ceilings


def _rate(run: Callable[[], object], work: float, repeats: int, synchronize: Callable[[], None]) -> float:
    """`work` per second of the fastest of `repeats` timed runs after a warm-up run. The fastest, not the mean: a run
    takes milliseconds, and one stalled by another thread would otherwise set the ceiling the plans are costed at."""
    run()
    synchronize()
    fastest = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize()
        fastest = min(fastest, time.perf_counter() - start)
    return work / fastest


def probe(device: torch.device) -> Ceilings:
    """Measures the ceilings in a few seconds: small enough to run at setup, large enough to be at the plateau."""
    on_gpu = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if on_gpu else (lambda: None)
    size = 8192 if on_gpu else 512
    dtype = torch.bfloat16 if on_gpu else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    matmul = _rate(lambda: a @ a, 2 * size**3, 20 if on_gpu else 5, sync) / 1e12
    del a
    # 2 GiB of weights, gradients and moments: an update streams them from memory, as a model's does, rather than
    # from the CPU's last-level cache.
    elements = 2**27
    params = [torch.zeros(elements)]
    grads, exp_avg, exp_avg_sq = [torch.full_like(params[0], 1e-3)], [torch.zeros(elements)], [torch.zeros(elements)]
    steps = [torch.tensor(0.0)]

    def cpu_adamw() -> None:
        torch._fused_adamw_(params, grads, exp_avg, exp_avg_sq, [], steps, lr=1e-3, beta1=0.9, beta2=0.999,
                            weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)

    adamw = _rate(cpu_adamw, elements, 5, lambda: None) / 1e9
    if not on_gpu:
        return Ceilings(device=platform.processor() or "cpu", matmul_tflops=matmul, h2d_gbps=math.inf,
                        d2h_gbps=math.inf, duplex_gbps=math.inf, cpu_adamw_gparams=adamw, on_gpu=False)
    nbytes = 512 * 2**20
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    gpu = torch.empty(nbytes, dtype=torch.uint8, device=device)
    host_back = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    gpu_out = torch.empty_like(gpu)
    h2d = _rate(lambda: gpu.copy_(host, non_blocking=True), nbytes, 5, sync) / 1e9
    d2h = _rate(lambda: host_back.copy_(gpu_out, non_blocking=True), nbytes, 5, sync) / 1e9
    side = torch.cuda.Stream(device)

    def both_ways() -> None:
        gpu.copy_(host, non_blocking=True)
        with torch.cuda.stream(side):
            host_back.copy_(gpu_out, non_blocking=True)

    duplex = _rate(both_ways, 2 * nbytes, 5, sync) / 1e9
    return Ceilings(device=torch.cuda.get_device_name(device), matmul_tflops=matmul, h2d_gbps=h2d, d2h_gbps=d2h,
                    duplex_gbps=duplex, cpu_adamw_gparams=adamw)
