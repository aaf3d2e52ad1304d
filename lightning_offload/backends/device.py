"""No offload: the model, its gradients and optimizer state stay on the training device.

The plan for models that fit (with the memory levers: 8-bit optimizer state, activation checkpointing, bf16
weights via `precision="bf16-true"`). Lightning's own single-device loop does the rest, so this backend only
places the module (and, across several processes, wraps it in DDP).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from lightning_offload.backends.base import Backend, BackendConfig, TrainingSetup
from lightning_offload.backends.spec import BackendSpec, MultiProcess
from lightning_offload.planner.measure import ModelStats
from lightning_offload.planner.terms import MemoryInputs, MemoryTerms, module_weights, step_updated_on_the_gpu


@dataclass(kw_only=True)
class DeviceConfig(BackendConfig):
    """No knobs: everything lives on the device."""


class DeviceBackend(Backend):
    name = "device"
    Config = DeviceConfig

    def __init__(self, config: DeviceConfig) -> None:
        super().__init__(config)
        self._device = torch.device("cpu")
        self._precision = "32-true"

    def setup_environment(self, device: torch.device) -> None:
        self._device = device

    def model_init_context(self) -> AbstractContextManager:
        # Built where it trains: on a GPU, building in host memory first would cost the whole fp32 model in RAM.
        return torch.device(self._device) if self._device.type == "cuda" else nullcontext()

    def setup_training(
        self, module: torch.nn.Module, optimizer: Optimizer, setup: TrainingSetup
    ) -> tuple[torch.nn.Module, Optimizer]:
        module = module.to(self._device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            # Nothing is sharded: several processes are plain data parallelism, PyTorch's DDP.
            from torch.nn.parallel import DistributedDataParallel

            module = DistributedDataParallel(module, device_ids=None if self._device.type == "cpu" else [self._device])
        return module, optimizer

    def setup_inference(self, module: torch.nn.Module, precision: str) -> torch.nn.Module:
        return module.to(self._device)

    def describe(self) -> str:
        return f"no offload ({self._precision}): parameters, gradients and optimizer state on {self._device}"


def memory_terms(inputs: MemoryInputs) -> MemoryTerms:
    # Frozen parameters take no gradient and no optimizer state: torch's optimizers skip what gets no gradient.
    stats, trained = inputs.stats, inputs.stats.trainable_parameters
    # The module trains in the dtype Lightning gives it; torch's AdamW keeps its state in the parameters' dtype.
    weights, size = module_weights(stats.precision)
    state = inputs.state_bytes * (size / 4 if inputs.plan.exact_optimizer else 1)
    gpu = {f"{weights} weights": size * stats.parameters, f"{weights} gradients": size * trained,
           "optimizer state": int(state * trained)}
    if inputs.accumulating:
        # A later micro-batch's gradient of a parameter exists beside the sum it is added to: counted as a whole
        # block's or the embedding's, whichever is larger.
        gpu[f"{weights} gradients (in flight, accumulating)"] = size * max(stats.trainable_block_parameters,
                                                                            stats.embedding_parameters)
    return MemoryTerms(gpu)


def _ddp_terms(stats: ModelStats) -> dict[str, int]:
    return {"DDP gradient buckets": 4 * stats.trainable_parameters}


SPEC = BackendSpec(
    name="device", engine=DeviceBackend, memory_terms=memory_terms, step_time=step_updated_on_the_gpu, checkpoint_weight_bytes=4,
    exact_optimizer="adamw", eight_bit_optimizer="adamw8bit",
    # DeepSpeed's CPU Adam steps host tensors only.
    pinned_optimizer=lambda optimizer: None if optimizer == "cpu_adam" else optimizer,
    # Several processes are DDP: every rank holds the whole model.
    multi_process=MultiProcess(shards_state=False, gpu_terms=_ddp_terms),
    runs_compiled_modules=True,
)
