"""Throughput and memory of a run, measured as it trains (the main job and sweeps report these)."""

from __future__ import annotations

import resource
import statistics
import threading
import time
from typing import Any

import lightning.pytorch as pl
import torch


def non_embedding_parameters(module: torch.nn.Module) -> int:
    """Parameters outside embedding tables (DeepSpeed-partitioned ones counted whole): the 6*N*T FLOP count's N."""
    total = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
    embeddings = sum(getattr(m.weight, "ds_numel", m.weight.numel()) for m in module.modules()
                     if isinstance(m, torch.nn.Embedding))
    return total - embeddings


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


class ThroughputMonitor(pl.Callback):
    """Times each training batch (synchronising the GPU), counts its tokens, and tracks peak memory.

    `summary()` gives the median and mean batch time over the batches after the first `warmup_steps`, tokens/s, model TFLOP/s
    (6 x non-embedding parameters x tokens / s), peak GPU memory as torch's allocator and as the whole device see it
    (the latter also counts engine and CUDA allocations), and the process's peak host RSS.
    """

    def __init__(self, warmup_steps: int = 2) -> None:
        self.warmup_steps = warmup_steps
        self.step_seconds: list[float] = []
        self.tokens_per_batch = 0
        self.non_embedding_params = 0
        self._device_memory = GpuMemorySampler()
        self._started = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.non_embedding_params = non_embedding_parameters(pl_module)
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self._device_memory = GpuMemorySampler().start()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        first = batch[0] if isinstance(batch, (list, tuple)) else batch
        self.tokens_per_batch = first.numel()
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.step_seconds.append(time.perf_counter() - self._started)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._device_memory.stop()

    def summary(self) -> dict[str, float]:
        steady = self.step_seconds[self.warmup_steps:] or self.step_seconds
        if not steady:
            return {}
        # Over all steady batches, so an optimizer step that lands on every k-th micro-batch is counted in full.
        tokens_per_s = self.tokens_per_batch * len(steady) / sum(steady)
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        return {
            "batch_s_median": statistics.median(steady),
            "batch_s_mean": statistics.mean(steady),
            "tokens_per_s": tokens_per_s,
            "model_tflops": 6 * self.non_embedding_params * tokens_per_s / 1e12,
            "peak_gpu_torch_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
            "peak_gpu_device_gib": self._device_memory.peak_bytes / 2**30,
            "peak_host_rss_gib": peak_host_rss_gib(),
        }
