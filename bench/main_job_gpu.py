"""Step time, throughput and memory of the main job (any `model=` / `data=` overrides) through `single_gpu_offload`.

    python bench/main_job_gpu.py model=llama_1b data=random_tokens trainer.max_steps=8 trainer.limit_val_batches=0

Prints one JSON line and a markdown row: median step time over the steps after the first two, tokens/s, model
TFLOP/s (6 x non-embedding parameters x tokens / s), peak GPU memory (torch's allocator, and device-wide from
`mem_get_info`, which also sees DeepSpeed's and CUDA's own allocations) and the process's peak host RSS.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from lightning_offload.train import train


class StepClock(pl.Callback):
    def __init__(self) -> None:
        self.step_seconds: list[float] = []
        self.tokens_per_step = 0
        self.device_peak_bytes = 0
        self._stop = threading.Event()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.non_embedding_params = non_embedding_parameters(pl_module)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            threading.Thread(target=self._poll_device_memory, daemon=True).start()

    def _poll_device_memory(self) -> None:
        while not self._stop.wait(0.05):
            free, total = torch.cuda.mem_get_info()
            self.device_peak_bytes = max(self.device_peak_bytes, total - free)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.tokens_per_step = batch[0].numel()
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_seconds.append(time.perf_counter() - self._started)

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop.set()


def non_embedding_parameters(module: torch.nn.Module) -> int:
    total = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
    embeddings = sum(getattr(m.weight, "ds_numel", m.weight.numel()) for m in module.modules()
                     if isinstance(m, torch.nn.Embedding))
    return total - embeddings


def main(overrides: list[str]) -> dict:
    with initialize_config_module(config_module="lightning_offload.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    output_dir = Path("outputs/bench") / time.strftime("%Y%m%d-%H%M%S")
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    clock = StepClock()
    started = time.perf_counter()
    metrics = train(cfg, extra_callbacks=[clock])
    steady = clock.step_seconds[2:] or clock.step_seconds
    step = statistics.median(steady)
    result = {
        "overrides": overrides,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "steps": len(clock.step_seconds),
        "step_s_median": round(step, 3),
        "step_s_mean": round(statistics.mean(steady), 3),
        "tokens_per_s": round(clock.tokens_per_step / step, 1),
        "params_non_embedding_b": round(clock.non_embedding_params / 1e9, 3),
        "model_tflops": round(6 * clock.non_embedding_params * clock.tokens_per_step / step / 1e12, 1),
        "peak_gpu_torch_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else 0,
        "peak_gpu_device_gib": round(clock.device_peak_bytes / 2**30, 2),
        "peak_host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "final_train_loss": metrics.get("train/loss"),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
