"""The memory planner: which plan trains a model fastest on this machine, and an honest refusal when none fits.

`plan(module, batch)` measures the model on the meta device (`measure`), estimates every candidate plan's bytes per
memory tier (`memory`) and step time from the machine's measured ceilings (`cost`), and chooses (`choose`).
`SingleGPUOffloadStrategy(backend="auto")` calls it at setup, before any large allocation.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from torch import nn

from lightning_offload.backends import registry
from lightning_offload.backends.needs import RunNeeds
from lightning_offload.activation_checkpointing import checkpoints_itself
from lightning_offload.planner.choose import (
    SAFETY_MARGIN,
    Candidate,
    PlanDoesNotFit,
    PlanReport,
    candidate_plans,
    cannot_run,
    choose,
    exclusions,
)
from lightning_offload.planner.budget import GIB
from lightning_offload.planner.cost import Ceilings, estimate_step_time, load_or_probe, probe
from lightning_offload.planner.disk import Disk, UnusableDisk, load_or_probe_disk
from lightning_offload.planner.measure import ModelStats, measure_model, measure_module, meta_network
from lightning_offload.planner.memory import Machine, MemoryEstimate, estimate_memory, shortfalls
from lightning_offload.planner.terms import EIGHT_BIT_OPTIMIZERS, Plan, StepTime

__all__ = [
    "GIB", "SAFETY_MARGIN", "Candidate", "Ceilings", "Disk", "Machine", "MemoryEstimate", "ModelStats", "Plan",
    "PlanDoesNotFit", "PlanReport", "RunNeeds", "StepTime", "candidate_plans", "choose", "compute_dtype",
    "default_precision", "native_bf16",
    "estimate_memory", "estimate_step_time", "load_or_probe", "measure_model", "measure_module", "meta_network",
    "plan", "probe", "shortfalls", "UnusableDisk", "load_or_probe_disk",
]


def compute_dtype(precision: str) -> torch.dtype:
    if "bf16" in precision:
        return torch.bfloat16
    return torch.float16 if "16" in precision else torch.float32


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` computes in bf16 natively: a CPU, or a CUDA GPU from Ampere (compute capability 8.0) on.
    Older GPUs (V100, T4, RTX 20xx) only emulate it, and Triton compiles no bf16 kernel for them."""
    device = torch.device(device)
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)


def default_precision(device: torch.device | str | None = None) -> str:
    """The Trainer precision a run on `device` (default: this machine's GPU, else its CPU) gets when none is given:
    bf16 mixed on a GPU that computes in bf16, fp16 mixed on an older one (as Lightning's bitsandbytes plugin falls
    back to fp16), fp32 on a CPU."""
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        return "32-true"
    return "bf16-mixed" if native_bf16(device) else "16-mixed"


def plan(model: nn.Module | ModelStats, example_input: Any = None, *, machine: Machine | None = None,
         ceilings: Ceilings | None = None, device: torch.device | str | None = None, backend: str = "auto",
         optimizer: str | None = None, activation_checkpointing: str | None = None, every_k: int | None = None,
         first_n: int | None = None, accumulate: int = 1, precision: str = "bf16-mixed", adamw_compatible: bool = True,
         world_size: int = 1, ranks_per_host: int | None = None, needs: RunNeeds | None = None,
         gpu_state_blocks: int | None = None, margin: float = SAFETY_MARGIN, nvme_path: str | None = None,
         offload_device: str | None = None, nvme_state: str | None = None, disk: Disk | None = None,
         disk_blocks: int | None = None, checkpointing: str | None = None) -> PlanReport:
    """Plans a run of `model` on a batch like `example_input` (default: a LightningModule's `example_input_array`).

    `machine` and `ceilings` default to this machine's (free memory right now; probed and cached ceilings); pass
    e.g. `Machine(gpu_memory_gib=24, host_memory_gib=64)` to plan for another. `backend`, `optimizer` and
    `activation_checkpointing` (a policy name, as the strategy's) pin levers (None / "auto": the planner chooses),
    and so does `gpu_state_blocks` for `host_adam` (None: the most blocks whose optimizer state fits on the GPU).
    `every_k` and `first_n` pin those policies' numbers (`first_n` None: the fewest first blocks that fit).
    `margin`: the fraction of each memory tier a plan may fill. `nvme_path` is a folder where `deepspeed` and
    `stream` plans may keep state (probed for its O_DIRECT bandwidth and free space, or described by `disk`);
    `offload_device` and `nvme_state` pin where (a plan pinned to `nvme` is taken however its disk traffic bounds
    it), and `disk_blocks` how many blocks' state a `stream` plan keeps there (pinned: taken likewise). With
    `world_size` processes (`ranks_per_host` per machine) only the engines that span processes are candidates, memory
    per GPU and per host. `needs`: what the run asks of an engine (its clipping, gradient hooks, callbacks; default:
    none of it) beside the Trainer's `precision`: backends that cannot run it are left out, and those that update
    inside backward are counted with every gradient kept when it needs them all before the step. `checkpointing`:
    the former name of `activation_checkpointing`, deprecated.
    Returns the report; `report.chosen` is None when nothing fits, and `report.error()` is the exception that says
    why.
    """
    if checkpointing is not None:
        warnings.warn("`plan(checkpointing=...)` is deprecated and will be removed in the next release; pass "
                      "`activation_checkpointing=`, the strategy's name for it.", FutureWarning, stacklevel=2)
        activation_checkpointing = activation_checkpointing or checkpointing
    checkpointing = activation_checkpointing
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(f"`accumulate` (micro-batches per optimizer step) must be an integer >= 1, got {accumulate!r}.")
    if backend not in (None, "auto", *registry.available_backends()):
        raise ValueError(f"`backend={backend!r}` is unknown. Choose one of {['auto', *registry.available_backends()]}.")
    # The precision is the run's: backends that cannot train with it are left out, a pinned one refused.
    needs = dataclasses.replace(needs or RunNeeds(), precision=precision)
    refusals = [] if backend in (None, "auto") else registry.spec(backend).engine.refusals(needs)
    if refusals:  # pinned: the engine's own refusal, which names the fix
        raise PlanDoesNotFit(refusals[0][1])
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(model, ModelStats):
        stats = model
    else:
        batch = example_input if example_input is not None else getattr(model, "example_input_array", None)
        if batch is None:
            raise ValueError(
                f"`plan` needs a batch to measure {type(model).__name__} with: pass `example_input` or set the "
                "module's `example_input_array`."
            )
        with meta_network(model, compute_dtype(precision)):
            stats = measure_module(model, batch, dtype=compute_dtype(precision))
            if checkpointing is None and checkpoints_itself(model):
                checkpointing = "full"  # every block recomputes itself, whatever a plan's policy would say
    stats = dataclasses.replace(stats, precision=precision)  # engines keep their weights by it
    machine = machine or Machine.detect(device)
    ceilings = ceilings or load_or_probe(device)
    backends = registry.available_backends() if backend in (None, "auto") else [backend]
    if world_size > 1:
        backends = [b for b in backends if b in registry.multi_process_backends()]
    if disk is None and nvme_path is not None and offload_device != "cpu":
        disk = load_or_probe_disk(nvme_path)
    plans = candidate_plans(stats, backends=backends, on_cuda=device.type == "cuda" or not machine.unified,
                            optimizer=optimizer, checkpointing=checkpointing, every_k=every_k, first_n=first_n,
                            adamw_compatible=adamw_compatible, gpu_state_blocks=gpu_state_blocks,
                            accumulate=accumulate, offload_device=offload_device, nvme_state=nvme_state,
                            disk_given=disk is not None, disk_blocks=disk_blocks, needs=needs)
    if not plans:
        reasons = exclusions(stats, backends=backends, on_cuda=device.type == "cuda" or not machine.unified,
                             optimizer=optimizer, checkpointing=checkpointing, adamw_compatible=adamw_compatible,
                             needs=needs)
        raise PlanDoesNotFit(
            "No plan runs with these settings: "
            + "; ".join(f"`{name}`: {reasons.get(name, 'no plan of it matches the pinned levers')}" for name in backends)
            + ". Pin another backend, or leave the optimizer and checkpointing to the planner (`optimizer=None`, "
            "`activation_checkpointing=None`)."
        )
    report = choose(stats, machine, ceilings, plans, accumulate=accumulate,
                    allow_eight_bit=optimizer in EIGHT_BIT_OPTIMIZERS, world_size=world_size,
                    ranks_per_host=ranks_per_host, holds_gradients=needs.holds_gradients, clipping=needs.clipping,
                    margin=margin, disk=disk,
                    disk_pinned=offload_device == "nvme" or disk_blocks is not None)
    left_out = {name: reason for name in backends if (reason := cannot_run(name, needs)) is not None}
    return dataclasses.replace(report, needs=needs, left_out=left_out)
