"""What the planner and the backends' specs share: a plan, what a backend's memory and step-time terms receive and
return, and the per-parameter constants of optimizer state and GPU updates.

The lowest layer of the planner: each backend's spec (`backends/spec.py`) computes its terms from these, and
`memory.py`, `cost.py` and `choose.py` loop over the specs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lightning_offload.backends import registry
from lightning_offload.planner.measure import ModelStats

if TYPE_CHECKING:
    from lightning_offload.planner.disk import Disk

# Bytes of optimizer state per parameter. bitsandbytes keeps one fp32 absmax per 256-element block per moment;
# the fused kernel's record is 528 bytes per 256 elements (bench/NOTES_kernel.md).
OPTIMIZER_STATE_BYTES = {
    "adamw": 8.0,
    "cpu_adam": 8.0,
    "adamw8bit": 2 + 2 * 4 / 256,
    "paged_adamw8bit": 2 + 2 * 4 / 256,
    "adamw8bit_fused": 528 / 256,
    "lion8bit": 1 + 4 / 256,
}
EIGHT_BIT_OPTIMIZERS = frozenset(name for name, size in OPTIMIZER_STATE_BYTES.items() if size < 4)
# The optimizers a pinned `optimizer=` names that mean 8-bit AdamW.
ADAMW_8BIT = frozenset({"adamw8bit", "adamw8bit_fused", "paged_adamw8bit"})
# Which state a plan on NVMe keeps there.
NVME_STATES = ("all", "parameters", "optimizer")
_ON_DISK = {"all": "all state", "parameters": "parameters", "optimizer": "optimizer state"}
# Update rates on the GPU, parameters per second: the fused 8-bit AdamW kernel, torch's fused AdamW on fp32 state,
# and bitsandbytes' 8-bit kernels (bench/RESULTS.md, "Calibration constants").
GPU_UPDATE_RATE = {"adamw8bit_fused": 205e9, "adamw": 100e9, "adamw8bit": 33e9, "paged_adamw8bit": 33e9,
                   "lion8bit": 33e9}
# Backward (with the recompute of checkpointed blocks) is about this share of a training step's compute.
BACKWARD_SHARE = 0.7


@dataclass(frozen=True, kw_only=True)
class Plan:
    backend: str
    """Where the state lives: `device` (nothing offloaded), `gpu_8bit` (bf16 weights + 8-bit state on the GPU,
    updated inside backward), `host_adam` (bf16 weights on the GPU, fp32 master + AdamW state in host memory),
    `stream` (blocks' weights and 8-bit state in host memory, streamed through the GPU), `deepspeed` (ZeRO-3,
    parameters and optimizer state in host memory) or `fsdp` (FSDP2 CPU offload)."""
    optimizer: str = "adamw"
    checkpointing: str = "full"
    """`none`, `full`, `every_k` (every `every_k`-th block), `first_n` (the first `first_n` blocks) or `offload`
    (saved tensors in pinned host memory)."""
    every_k: int = 2
    first_n: int | None = None
    """`first_n`: how many blocks, from the first, are recomputed; None (a candidate before `choose`): the fewest
    that fit."""
    pin_memory: bool = True
    resident_blocks: int | None = 0
    """`stream`: blocks whose weights stay on the GPU; the others stream from host memory. `host_adam`: blocks at
    the front of the model whose fp32 master weights and AdamW state stay on the GPU, with the input embedding,
    updated there inside backward; the others' state is in host memory. None (a `host_adam` candidate before
    `choose`): the most that fit."""
    accumulate_on_gpu: bool = False
    """`fsdp` with gradient accumulation: the micro-batches' gradients add up on the GPU in fp32 and go to host
    memory once per step, instead of once per micro-batch."""
    offload_device: str = "cpu"
    """`deepspeed`: `cpu` (state in host memory) or `nvme` (ZeRO-Infinity: `nvme_state` in files on a disk)."""
    nvme_state: str = "all"
    """`deepspeed` on `nvme`: the state kept on disk: `all`, `parameters` (bf16 weights) or `optimizer` (fp32
    master weights, gradients and optimizer state)."""
    disk_blocks: int | None = 0
    """`stream`: blocks whose 8-bit optimizer state lives in files under `nvme_path`; None (a candidate before
    `choose`): the fewest that fit."""

    def __str__(self) -> str:
        policy = {"every_k": f"every_{self.every_k}", "first_n": f"first_{self.first_n}"}.get(self.checkpointing,
                                                                                             self.checkpointing)
        spec = registry.find(self.backend)
        detail = spec.plan_detail(self) if spec is not None else ""
        accumulated = ", gradients accumulated on the GPU" if self.accumulate_on_gpu else ""
        on_disk = f", {_ON_DISK[self.nvme_state]} on NVMe" if self.on_disk else ""
        return f"{self.backend} + {self.optimizer} + activation_checkpointing={policy}{detail}{accumulated}{on_disk}"

    @property
    def on_disk(self) -> bool:
        spec = registry.find(self.backend)
        return spec is not None and spec.keeps_state_on_disk and self.offload_device == "nvme"

    @property
    def parameters_on_disk(self) -> bool:
        return self.on_disk and self.nvme_state in ("all", "parameters")

    @property
    def optimizer_on_disk(self) -> bool:
        return self.on_disk and self.nvme_state in ("all", "optimizer")

    @property
    def exact_optimizer(self) -> bool:
        """True when the optimizer's arithmetic is the user's (fp32 state), False for 8-bit state."""
        return self.optimizer not in EIGHT_BIT_OPTIMIZERS


def compute_weights(precision: str) -> tuple[str, int]:
    """The dtype (its name, bytes per element) of the weights an engine computes with, and of their gradients, under
    the Trainer's `precision`: the 16-bit precisions keep 16-bit copies, `32-true` fp32."""
    if precision.startswith("64"):
        return "fp64", 8
    if precision.startswith("32"):
        return "fp32", 4
    return ("fp16", 2) if precision.startswith("16") else ("bf16", 2)


def module_weights(precision: str) -> tuple[str, int]:
    """The dtype (its name, bytes per element) Lightning builds a module's parameters in under `precision`: the
    `-true` precisions in their dtype, the `-mixed` ones in fp32 (autocast computes in 16 bits)."""
    return ("fp32", 4) if precision.endswith("-mixed") else compute_weights(precision)


def checkpointed_blocks(stats: ModelStats, plan: Plan) -> int:
    if plan.checkpointing in ("none", "offload"):
        return 0
    if plan.checkpointing == "first_n":
        return min(plan.first_n or 0, stats.blocks)
    return stats.blocks if plan.checkpointing == "full" else math.ceil(stats.blocks / plan.every_k)


@dataclass(frozen=True)
class MemoryInputs:
    """What a backend's memory terms are computed from (`estimate_memory`'s arguments, for one rank)."""

    stats: ModelStats
    plan: Plan
    whole_gradients: bool
    """Every gradient is kept until the step (accumulating, or clipping by global norm)."""
    accumulating: bool

    @property
    def state_bytes(self) -> float:
        """Bytes of optimizer state per parameter of the plan's optimizer."""
        return OPTIMIZER_STATE_BYTES[self.plan.optimizer]

    @property
    def weights(self) -> tuple[str, int]:
        """The dtype (name, bytes) of the weights an engine computes with under the run's precision."""
        return compute_weights(self.stats.precision)

    def gradients_updated_in_backward(self, unit: int) -> dict[str, int]:
        """The gradients (in the weights' dtype) of an engine that updates a unit of `unit` parameters as soon as its
        gradients are final: one unit's in flight while the previous unit's update runs; accumulating (or clipping
        by norm) keeps every gradient until the step besides them."""
        name, size = self.weights
        terms = {f"{name} gradients (in flight)": 2 * size * unit}
        if self.whole_gradients:
            terms[f"{name} gradients (kept until the step)"] = size * self.stats.trainable_parameters
        return terms


@dataclass(frozen=True)
class MemoryTerms:
    """A backend's bytes by term per tier; `pinned` names the host terms that are page-locked."""

    gpu: dict[str, int]
    host: dict[str, int] = field(default_factory=dict)
    pinned: frozenset[str] = frozenset()
    disk: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class StepTime:
    """Estimated seconds per optimizer step, by phase; `total` is what does not overlap."""

    compute: float
    transfer: float
    optimizer: float
    total: float
    disk: float = 0.0
    """Seconds of disk traffic the step cannot hide under compute (state on NVMe)."""
    disk_read_bytes: int = 0
    disk_write_bytes: int = 0


@dataclass(frozen=True)
class StepInputs:
    """What a backend's step time is computed from: the model, the plan and the machine's rates, and the phases
    every plan shares (compute, activation copies)."""

    stats: ModelStats
    plan: Plan
    accumulate: int
    disk: Disk | None
    compute: float
    """Seconds of compute of the step's micro-batches (recompute included)."""
    h2d: float
    d2h: float
    duplex: float
    """Bytes per second to the GPU, from it, and both ways at once."""
    cpu_adamw: float
    """Parameters per second the CPU's fused AdamW steps."""
    passes: int
    """Passes over the weights per micro-batch: forward, backward, and a recompute when blocks are checkpointed."""
    offload: float
    """Seconds of activation copies (`offload` checkpointing), and the part of them compute does not hide."""
    offload_exposed: float

    @property
    def backward_of_last(self) -> float:
        """Seconds of the last micro-batch's backward, which an engine's update may overlap."""
        return BACKWARD_SHARE * self.compute / self.accumulate


def step_updated_on_the_gpu(inputs: StepInputs) -> StepTime:
    """The step of an engine that keeps everything on the GPU: compute, then the update at the GPU's rate."""
    optimizer = inputs.stats.parameters / GPU_UPDATE_RATE.get(inputs.plan.optimizer, GPU_UPDATE_RATE["adamw"])
    return StepTime(inputs.compute, inputs.offload, optimizer, inputs.compute + inputs.offload_exposed + optimizer)


@dataclass(frozen=True)
class CandidateLevers:
    """The levers a backend's candidate plans take beyond optimizer and policy: `gpu_state_blocks` pinned (None:
    sized by `choose`), `accumulate` micro-batches, where state may go (`offload_device`, `nvme_state`; a disk
    only where the user gave one: `disk_given`) and how many blocks' state goes there (`disk_blocks` pinned; None:
    sized by `choose`)."""

    gpu_state_blocks: int | None = None
    accumulate: int = 1
    offload_device: str | None = None
    nvme_state: str | None = None
    disk_given: bool = False
    disk_blocks: int | None = None
