"""Throughput and memory of a run, measured as it trains.

`ThroughputMonitor` is the telemetry callback: `single_gpu_offload` adds it to every fit unless the Trainer already
has one (or the strategy was built with `telemetry=False`). Each optimizer step it logs tokens/s, model TFLOP/s,
MFU, peak GPU memory, host RSS, pinned host memory and the bytes copied between host and device (by the backend
and the activation offload), to the Trainer's loggers and (the first three that apply) to the progress bar. The
main job and sweeps read `summary()`.
"""

from __future__ import annotations

import resource
import statistics
import threading
import time
from typing import Any

import lightning.pytorch as pl
import psutil
import torch

from lightning_offload.activation_checkpointing import activation_offloader
from lightning_offload.activation_offload import ActivationOffloader
from lightning_offload.backends.base import DEVICE_TO_HOST, HOST_TO_DEVICE
from lightning_offload.planner.budget import GIB


# Dense bf16 tensor-core peak (TFLOP/s, fp32 accumulate) from NVIDIA's datasheets, matched by a fragment of
# `torch.cuda.get_device_name()`, first match wins. Our own table because Lightning's `get_available_flops` has no
# entry for "NVIDIA H200" or the L40S (it reads "L40S" as the L4) and lists sparse figures for some parts.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h200 nvl", 835.5),
    ("h200", 989.4),          # H200 SXM and GH200
    ("h100 80gb hbm3", 989.4),  # H100 SXM
    ("h100 sxm", 989.4),
    ("h100 pcie", 756.0),
    ("a100", 312.0),          # SXM and PCIe, 40 and 80 GB
    ("l40s", 362.0),
    ("rtx 4090", 165.2),
)


def bf16_peak_tflops(device_name: str) -> float | None:
    """The device's dense bf16 peak, or None for a device not in `BF16_PEAK_TFLOPS` (MFU is then not reported)."""
    name = device_name.lower()
    return next((peak for fragment, peak in BF16_PEAK_TFLOPS if fragment in name), None)


def non_embedding_parameters(module: torch.nn.Module) -> int:
    """Parameters outside embedding tables (DeepSpeed-partitioned ones counted whole): the 6*N*T FLOP count's N."""
    total = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
    embeddings = sum(getattr(m.weight, "ds_numel", m.weight.numel()) for m in module.modules()
                     if isinstance(m, torch.nn.Embedding))
    return total - embeddings


def count_tokens(batch: Any) -> int:
    """Elements of the batch's first tensor (`input_ids` for a dict): the tokens of a language-model batch."""
    if isinstance(batch, torch.Tensor):
        return batch.numel()
    if isinstance(batch, dict):
        return count_tokens(batch["input_ids"] if "input_ids" in batch else next(iter(batch.values())))
    if isinstance(batch, (list, tuple)) and batch:
        return count_tokens(batch[0])
    return 0


class GpuMemorySampler:
    """Polls device-wide used memory (`cudaMemGetInfo`) in a thread.

    Device-wide use counts what torch's allocator never sees: bitsandbytes' paged (managed) optimizer state, the
    CUDA context, cuBLAS workspaces. Polling starts once the main thread has initialised CUDA (never earlier: the
    poll would create the context itself).
    """

    def __init__(self, interval_s: float = 0.05) -> None:
        self.peak_bytes = 0
        self._interval_s = interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def start(self) -> GpuMemorySampler:
        if torch.cuda.is_available():
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self.sample()

    def __enter__(self) -> GpuMemorySampler:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def sample(self) -> None:
        if torch.cuda.is_initialized():
            free, total = torch.cuda.mem_get_info()
            self.peak_bytes = max(self.peak_bytes, total - free)

    def _poll(self) -> None:
        while not self._stopped.wait(self._interval_s):
            self.sample()


def peak_host_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def host_rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def pinned_host_bytes() -> int | None:
    """Pinned host memory held by torch's caching host allocator (what `tensor.pin_memory()` and DeepSpeed's pinned
    buffers use); None before CUDA is initialised or where torch keeps no such statistics."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return torch.cuda.host_memory_stats().get("allocated_bytes.current")


class _ThroughputMonitorCore:
    """Times each optimizer step, counts its tokens and tracks memory; logs one row of figures per step.

    A step's time runs from the end of the previous step to the end of this one (the GPU synchronised at both ends),
    so data loading, logging and the optimizer step are counted; validation and checkpoint writes inside the fit are
    not. With gradient accumulation a step is all its micro-batches.

    Args:
        warmup_steps: steps left out of `summary()` (compilation, allocator and engine warm-up).
        prog_bar: show tokens/s, MFU (or model TFLOP/s where the device's peak is unknown) and peak memory in the
            progress bar; every figure goes to the loggers either way.
    """

    def __init__(self, warmup_steps: int = 2, prog_bar: bool = True) -> None:
        self.warmup_steps = warmup_steps
        self.prog_bar = prog_bar
        self.step_seconds: list[float] = []
        self.step_tokens: list[int] = []
        self.non_embedding_params = 0
        self.peak_tflops: float | None = None
        self.peak_pinned_bytes = 0
        self.transferred_bytes: dict[str, int] = {}
        self._cuda = False
        self._backend: Any = None
        self._activation_offloader: ActivationOffloader | None = None
        self._device_memory = GpuMemorySampler()
        self._mark: float | None = None
        self._pending_seconds = 0.0
        self._pending_tokens = 0
        self._logged_step = 0
        self._transfer_baseline: dict[str, int] = {}

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        device = trainer.strategy.root_device
        self._cuda = device.type == "cuda"
        self.step_seconds, self.step_tokens = [], []
        self.non_embedding_params = non_embedding_parameters(pl_module)
        self.peak_tflops = bf16_peak_tflops(torch.cuda.get_device_name(device)) if self._cuda else None
        self.peak_pinned_bytes = 0
        self._backend = getattr(trainer.strategy, "backend", None)
        self._activation_offloader = activation_offloader(pl_module)
        self._transfer_baseline = self._transfer_counters()
        self.transferred_bytes = {}
        self._mark, self._pending_seconds, self._pending_tokens = None, 0.0, 0
        self._logged_step = trainer.global_step
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(device)
            self._device_memory = GpuMemorySampler().start()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._pending_tokens += count_tokens(batch)
        if self._mark is None:
            self._synchronize()
            self._mark = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self._logged_step:
            return  # gradients are still accumulating: the step is not over
        self._logged_step = trainer.global_step
        self._pause()
        self._mark = time.perf_counter()
        self.step_seconds.append(self._pending_seconds)
        self.step_tokens.append(self._pending_tokens)
        self._pending_seconds, self._pending_tokens = 0.0, 0
        self._log(pl_module, self.step_figures())

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._pause()

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self._pause()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._device_memory.stop()

    def _synchronize(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()

    def _pause(self) -> None:
        """Adds the time since the last mark to the current step and stops the clock until the next batch."""
        if self._mark is not None:
            self._synchronize()
            self._pending_seconds += time.perf_counter() - self._mark
            self._mark = None

    def _transfer_counters(self) -> dict[str, int]:
        """What the engine copied between host and device memory, and the activation offload's copies."""
        counters = dict(self._backend.transfer_counters()) if self._backend is not None else {}
        if self._activation_offloader is not None:
            for direction, moved in ((DEVICE_TO_HOST, self._activation_offloader.copied_out_bytes),
                                     (HOST_TO_DEVICE, self._activation_offloader.copied_back_bytes)):
                counters[direction] = counters.get(direction, 0) + moved
        return counters

    def step_figures(self) -> dict[str, float]:
        """The figures of the last step: what is logged."""
        tokens_per_s = self.step_tokens[-1] / max(self.step_seconds[-1], 1e-9)
        figures = {"perf/tokens_per_s": tokens_per_s, "perf/step_s": self.step_seconds[-1]}
        figures.update(self._flops(tokens_per_s))
        if self._cuda:
            self._device_memory.sample()
            figures["mem/gpu_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
            figures["mem/gpu_device_peak_gib"] = self._device_memory.peak_bytes / GIB
        figures["mem/host_rss_gib"] = host_rss_bytes() / GIB
        pinned = pinned_host_bytes()
        if pinned is not None:
            self.peak_pinned_bytes = max(self.peak_pinned_bytes, pinned)
            figures["mem/pinned_host_gib"] = pinned / GIB
        counters = self._transfer_counters()
        for name, total in counters.items():
            moved = total - self._transfer_baseline.get(name, 0) - self.transferred_bytes.get(name, 0)
            self.transferred_bytes[name] = self.transferred_bytes.get(name, 0) + moved
            figures[f"pcie/{name}_gib"] = moved / GIB
        return figures

    def _flops(self, tokens_per_s: float) -> dict[str, float]:
        tflops = 6 * self.non_embedding_params * tokens_per_s / 1e12
        if self.peak_tflops is None:
            return {"perf/model_tflops": tflops}
        return {"perf/model_tflops": tflops, "perf/mfu": tflops / self.peak_tflops}

    def _log(self, pl_module: Any, figures: dict[str, float]) -> None:
        speed = "perf/mfu" if "perf/mfu" in figures else "perf/model_tflops"
        memory = "mem/gpu_device_peak_gib" if self._cuda else "mem/host_rss_gib"
        in_bar = {"perf/tokens_per_s", speed, memory} if self.prog_bar else set()
        for name, value in figures.items():
            pl_module.log(name, value, prog_bar=name in in_bar, on_step=True, on_epoch=False, batch_size=1)

    def summary(self) -> dict[str, float]:
        """Over the steps after the first `warmup_steps` (all of them if there are no more): step time, tokens/s,
        model TFLOP/s (and MFU on a known device), and the fit's peak memory per tier."""
        steady = slice(self.warmup_steps, None) if len(self.step_seconds) > self.warmup_steps else slice(None)
        seconds, tokens = self.step_seconds[steady], self.step_tokens[steady]
        if not seconds:
            return {}
        tokens_per_s = sum(tokens) / sum(seconds)
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        figures = {
            "step_s_median": statistics.median(seconds),
            "step_s_mean": statistics.mean(seconds),
            "tokens_per_s": tokens_per_s,
            **{name.removeprefix("perf/"): value for name, value in self._flops(tokens_per_s).items()},
            "peak_gpu_torch_gib": torch.cuda.max_memory_allocated() / GIB if cuda else 0.0,
            "peak_gpu_device_gib": self._device_memory.peak_bytes / GIB,
            "peak_host_rss_gib": peak_host_rss_gib(),
            "peak_pinned_host_gib": self.peak_pinned_bytes / GIB,
        }
        figures.update({f"pcie_{name}_gib": moved / GIB for name, moved in self.transferred_bytes.items()})
        return figures


class ThroughputMonitor(_ThroughputMonitorCore, pl.Callback):
    __doc__ = _ThroughputMonitorCore.__doc__
