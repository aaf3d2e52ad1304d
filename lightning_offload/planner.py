"""The memory model: bytes on the GPU and in host memory for a model, a batch shape and a plan, term by term.

Pure functions over dataclasses. The model-dependent inputs come from one forward pass on the meta device
(`measure_model`): it allocates nothing, yet autograd records every tensor it would save for backward at the real
shapes, so activation bytes per block are measured, not guessed. Engine constants are named where they are used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_offload.checkpointing import find_blocks

GIB = 2**30
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
CUDA_CONTEXT_BYTES = int(0.6 * GIB)  # the CUDA context and cuBLAS workspaces: outside torch's allocator
# Logits are kept in bf16, upcast to fp32 for the loss, and their fp32 gradient exists during backward.
LOGIT_BYTES = 2 + 4 + 4


@dataclass(frozen=True, kw_only=True)
class ModelStats:
    """What the memory model needs to know of a model at one batch shape."""

    parameters: int
    block_parameters: int
    """Parameters of one repeated block (the decoder layer)."""
    blocks: int
    activation_bytes_per_block: int
    """Bytes one block saves for backward without checkpointing, at the measured batch shape and dtype."""
    block_input_bytes: int
    """Bytes of one block's input: what a checkpointed block keeps."""
    logits: int
    """Elements of the output logits (batch x sequence x vocabulary)."""

    @property
    def other_parameters(self) -> int:
        """Embeddings, final norm and output layer: outside the blocks."""
        return self.parameters - self.blocks * self.block_parameters


class _FusedAttentionSaves(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention on the meta device, saving what the fused kernels save.

    On meta tensors SDPA decomposes into the math path, which saves the full attention matrix (B x H x S x S);
    the flash and memory-efficient kernels used on GPUs (and the CPU's flash kernel) save only q, k, v, the output
    and an fp32 log-sum-exp per query.
    """

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        output = torch.empty_like(query)
        ctx.save_for_backward(query, key, value, output, query.new_empty(query.shape[:-1], dtype=torch.float32))
        return output

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> None:
        raise RuntimeError("Only the forward pass is measured.")


def _fused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any,
                     **kwargs: Any) -> torch.Tensor:
    return _FusedAttentionSaves.apply(query, key, value)


def measure_model(model: nn.Module, example_input: torch.Tensor, *, dtype: torch.dtype = torch.bfloat16,
                  forward: Callable[[nn.Module, torch.Tensor], Any] | None = None) -> ModelStats:
    """Measures `model` (built on the meta device) on `example_input` (a meta tensor of the real batch shape).

    Saved tensors are counted per block by hooks that know which block is running; `dtype` is the compute dtype
    the parameters are cast to first (bf16 for the mixed-precision plans).
    """
    model = model.to(dtype=dtype) if dtype is not None else model
    blocks = find_blocks(model)
    if not blocks:
        raise ValueError(f"No repeated block found in {type(model).__name__}; the planner models block by block.")
    running: list[int] = []
    saved_per_block = [0] * len(blocks)
    block_inputs = [0] * len(blocks)

    def enter(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            running.append(index)
            first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            block_inputs[index] = 0 if first is None else first.numel() * first.element_size()
        return hook

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        running.pop()

    parameter_ids = {id(p) for p in model.parameters()}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        # Layers save their weights (or transposed views of them) for backward: memory the weights take anyway.
        base = tensor._base if tensor._base is not None else tensor
        if running and id(base) not in parameter_ids:
            saved_per_block[running[-1]] += tensor.numel() * tensor.element_size()
        return tensor

    handles = []
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(enter(index), with_kwargs=True))
        handles.append(block.register_forward_hook(leave))
    attention = torch.nn.functional.scaled_dot_product_attention
    if example_input.is_meta:
        torch.nn.functional.scaled_dot_product_attention = _fused_attention
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = forward(model, example_input) if forward else model(example_input)
    finally:
        torch.nn.functional.scaled_dot_product_attention = attention
        for handle in handles:
            handle.remove()
    logits = output if isinstance(output, torch.Tensor) else output.logits
    return ModelStats(
        parameters=sum(p.numel() for p in model.parameters()),
        block_parameters=sum(p.numel() for p in blocks[0].parameters()),
        blocks=len(blocks),
        activation_bytes_per_block=max(saved_per_block),
        block_input_bytes=max(block_inputs),
        logits=logits.numel(),
    )


@dataclass(frozen=True, kw_only=True)
class Plan:
    backend: str
    """`device` (no offload), `deepspeed` (ZeRO-3, params + optimizer in host memory) or `fsdp` (CPU offload)."""
    optimizer: str = "adamw"
    checkpointing: str = "full"
    every_k: int = 2
    pin_memory: bool = True

    def __str__(self) -> str:
        policy = f"every_{self.every_k}" if self.checkpointing == "every_k" else self.checkpointing
        return f"{self.backend} + {self.optimizer} + checkpointing={policy}"


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per tier, term by term (`gpu`, `host`), for one plan; `host_pinned` says which host terms are pinned."""

    plan: Plan
    gpu: dict[str, int]
    host: dict[str, int]
    host_pinned: frozenset[str] = field(default_factory=frozenset)

    @property
    def gpu_bytes(self) -> int:
        return sum(self.gpu.values())

    @property
    def host_bytes(self) -> int:
        return sum(self.host.values())

    @property
    def pinned_bytes(self) -> int:
        return sum(v for k, v in self.host.items() if k in self.host_pinned)


def _activation_terms(stats: ModelStats, plan: Plan) -> dict[str, int]:
    per_block, block_input, layers = stats.activation_bytes_per_block, stats.block_input_bytes, stats.blocks
    if plan.checkpointing == "none":
        return {"activations": layers * per_block}
    if plan.checkpointing == "offload":
        # Saved tensors live in host memory; two blocks' worth are in flight on the GPU.
        return {"activations (in flight)": 2 * per_block}
    checkpointed = layers if plan.checkpointing == "full" else math.ceil(layers / plan.every_k)
    return {
        "activations (checkpointed blocks' inputs)": checkpointed * block_input,
        "activations (kept blocks)": (layers - checkpointed) * per_block,
        "activations (one block recomputed)": per_block,
    }


def estimate_memory(stats: ModelStats, plan: Plan, *, reduce_bucket_elements: int = 200_000_000,
                    prefetch_bucket_elements: int = 50_000_000) -> MemoryEstimate:
    """Bytes `plan` needs for a model described by `stats` (bf16 compute, fp32 master weights)."""
    params, state_bytes = stats.parameters, OPTIMIZER_STATE_BYTES[plan.optimizer]
    gpu: dict[str, int] = {"CUDA context": CUDA_CONTEXT_BYTES, "logits and loss": stats.logits * LOGIT_BYTES}
    gpu.update(_activation_terms(stats, plan))
    host: dict[str, int] = {}
    if plan.checkpointing == "offload":
        host["saved activations"] = stats.blocks * stats.activation_bytes_per_block
    if plan.backend == "device":
        gpu.update({"fp32 weights": 4 * params, "fp32 gradients": 4 * params,
                    "optimizer state": int(state_bytes * params)})
        pinned: set[str] = {"saved activations"}
    elif plan.backend == "deepspeed":
        gathered = 2 * max(stats.block_parameters, stats.other_parameters)
        gpu.update({
            "gathered bf16 weights (two blocks)": 2 * gathered,
            "prefetch bucket": 2 * prefetch_bucket_elements,
            "gradient reduce buckets (bf16, double-buffered)": 2 * 2 * reduce_bucket_elements,
        })
        host.update({"bf16 weight partitions": 2 * params, "fp32 master weights": 4 * params,
                     "fp32 gradients": 4 * params, "optimizer state": int(state_bytes * params)})
        pinned = set(host) if plan.pin_memory else {"saved activations"}
    elif plan.backend == "fsdp":
        gpu.update({
            "gathered bf16 weights (two blocks)": 2 * 2 * stats.block_parameters,
            "root unit bf16 weights (embeddings, head)": 2 * stats.other_parameters,
            "fp32 gradients of one block before offload": 4 * stats.block_parameters,
        })
        host.update({"fp32 weight shards": 4 * params, "fp32 gradient shards": 4 * params,
                     "optimizer state": int(state_bytes * params)})
        pinned = {"fp32 weight shards", "fp32 gradient shards", "saved activations"} if plan.pin_memory else set()
    else:
        raise ValueError(f"Unknown backend {plan.backend!r} in the plan. Choose 'device', 'deepspeed' or 'fsdp'.")
    return MemoryEstimate(plan, gpu, host, frozenset(pinned & set(host)))


@dataclass(frozen=True, kw_only=True)
class Machine:
    """Memory a run may use. Defaults describe the project's H100 machine (80 GB card, 125 GiB RAM)."""

    gpu_memory_gib: float = 79.2
    host_memory_gib: float = 125.0

    @classmethod
    def detect(cls) -> Machine:
        import psutil

        gpu = torch.cuda.mem_get_info()[1] / GIB if torch.cuda.is_available() else 0.0
        return cls(gpu_memory_gib=gpu, host_memory_gib=psutil.virtual_memory().available / GIB)


class PlanDoesNotFit(ValueError):
    """No candidate plan fits the machine; the message names each tier's shortfall and the nearest plan."""


def shortfalls(estimate: MemoryEstimate, machine: Machine, margin: float = 0.9) -> dict[str, float]:
    """GiB missing per tier (empty when the plan fits), keeping `1 - margin` of each tier free."""
    missing = {
        "GPU": estimate.gpu_bytes / GIB - margin * machine.gpu_memory_gib,
        "host RAM": estimate.host_bytes / GIB - margin * machine.host_memory_gib,
    }
    return {tier: gib for tier, gib in missing.items() if gib > 0}


def refusal(estimates: list[MemoryEstimate], machine: Machine, margin: float = 0.9) -> PlanDoesNotFit:
    """The error raised before any large allocation when no plan fits, with the plan that comes nearest."""
    nearest = min(estimates, key=lambda e: sum(shortfalls(e, machine, margin).values()))
    missing = ", ".join(f"{tier} short by {gib:.1f} GiB" for tier, gib in shortfalls(nearest, machine, margin).items())
    return PlanDoesNotFit(
        f"No plan fits this machine ({machine.gpu_memory_gib:.0f} GiB GPU, {machine.host_memory_gib:.0f} GiB host "
        f"RAM, {100 * (1 - margin):.0f}% kept free). Nearest: {nearest.plan}: {missing} "
        f"(needs {nearest.gpu_bytes / GIB:.1f} GiB GPU, {nearest.host_bytes / GIB:.1f} GiB host). "
        "Try a smaller micro-batch, `checkpointing=full`, an 8-bit optimizer, or a machine with more memory."
    )
