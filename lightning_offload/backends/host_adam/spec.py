"""The `host_adam` backend as the planner sees it: its memory and step-time terms and its candidate plans."""

from __future__ import annotations

import dataclasses

from lightning_offload.backends.host_adam.backend import HostAdamBackend, HostAdamConfig
from lightning_offload.backends.host_adam.checkpoint import (CHECKPOINT_FILE, client_state, folder_fp32_tensors,
                                                         saved_weights)
from lightning_offload.backends.host_adam.engine import STAGING_SLOTS
from lightning_offload.backends.spec import BackendSpec
from lightning_offload.planner.measure import ModelStats
from lightning_offload.planner.terms import (BACKWARD_SHARE, GPU_UPDATE_RATE, CandidateLevers, MemoryInputs,
                                             MemoryTerms, Plan, StepInputs, StepTime, checkpointed_blocks,
                                             module_weights)

# The engine's buffers at their default sizes: pinned fp32 gradient slots of one bucket each, and fp32 staging
# pieces on the GPU, where the updated weights land to be cast there (`cast_on_device`, the default; casting on the
# host stages 32 MiB of bf16 in pinned host memory instead).
GRADIENT_SLOT_BYTES = HostAdamConfig.grad_slots * HostAdamConfig.bucket_numel * 4
DEVICE_STAGING_BYTES = STAGING_SLOTS * HostAdamConfig.chunk_numel * 4
# The bucket pipeline (gradients out, fused AdamW, fp32 weights back and cast on the GPU, its default) reaches this
# share of the fused CPU AdamW rate the planner's probe reads at a fit's setup, `cast_on_device=False` alike
# (bench/RESULTS.md, "Calibration constants").
PIPELINE_SHARE = 0.44


def gpu_state_parameters(stats: ModelStats, plan: Plan) -> int:
    """Trainable parameters whose optimizer state stays on the GPU: those of the first `resident_blocks` blocks and
    of the input embedding before them (the backend's `gpu_state_blocks`)."""
    blocks = min(plan.resident_blocks or 0, stats.blocks)
    return blocks * stats.trainable_block_parameters + (stats.trainable_embedding_parameters if blocks else 0)


def gradients_waiting_for_the_host(stats: ModelStats, plan: Plan, gradient_bytes: int) -> int:
    """Gradients (`gradient_bytes` each) of the blocks whose state is in host memory that may wait on the GPU for a
    pinned slot while the host steps earlier ones, beyond the activations their own backward frees.

    Nothing but the host's pace bounds that queue, so all of them count. A block kept whole frees more than it
    produces; a checkpointed block frees only its input.
    """
    host_blocks = stats.blocks - min(plan.resident_blocks or 0, stats.blocks)
    checkpointed = checkpointed_blocks(stats, plan) / stats.blocks if stats.blocks else 0.0
    freed = (0 if plan.checkpointing == "offload" else
             checkpointed * stats.block_input_bytes + (1 - checkpointed) * stats.activation_bytes_per_block)
    return int(host_blocks * max(0.0, gradient_bytes * stats.trainable_block_parameters - freed))


def memory_terms(inputs: MemoryInputs) -> MemoryTerms:
    """fp32 gradients land in a few pinned slots, and the updated weights leave as fp32 straight from the master
    weights, which are page-locked for it; the AdamW state is ordinary memory, since no copy starts or ends in it.
    The front blocks' master weights and state are on the GPU instead. State is kept for trainable parameters only
    (a frozen one cannot be hooked)."""
    stats, plan, state_bytes = inputs.stats, inputs.plan, inputs.state_bytes
    trained, trained_block = stats.trainable_parameters, stats.trainable_block_parameters
    on_gpu = gpu_state_parameters(stats, plan)
    weights, size = inputs.weights
    gpu = {f"{weights} weights": size * stats.parameters, **inputs.gradients_updated_in_backward(trained_block),
           "weight staging (fp32, cast here)": DEVICE_STAGING_BYTES}
    if on_gpu:
        gpu["fp32 master weights and optimizer state (front blocks)"] = int((4 + state_bytes) * on_gpu)
    waiting = gradients_waiting_for_the_host(stats, plan, size) - 2 * size * trained_block
    if waiting > 0 and not inputs.whole_gradients:
        gpu[f"{weights} gradients waiting for the host"] = waiting
    host = {"fp32 master weights": 4 * (trained - on_gpu), "optimizer state": int(state_bytes * (trained - on_gpu)),
            "gradient slots": GRADIENT_SLOT_BYTES}
    return MemoryTerms(gpu, host, frozenset({"fp32 master weights", "gradient slots"}))


def built_on_gpu(inputs: MemoryInputs) -> int:
    """The module is built on the GPU in the dtype Lightning gives it (fp32 under `bf16-mixed`), each weight cast
    to the engine's once its master copy is in host memory."""
    return module_weights(inputs.stats.precision)[1] * inputs.stats.parameters


def step_time(inputs: StepInputs) -> StepTime:
    """Gradients leave, the CPU steps and weights return bucket by bucket, from the first bucket (the output layer,
    early in the last backward) on. The front blocks' state is on the GPU: they are updated there at the GPU's rate
    on the compute stream, and the next forward runs through them while the host finishes the back blocks, so the
    host work may also hide under that part of the next forward."""
    stats, plan, compute = inputs.stats, inputs.plan, inputs.compute
    on_gpu = gpu_state_parameters(stats, plan)
    on_host = stats.trainable_parameters - on_gpu
    pipeline = max(4 * on_host / inputs.d2h, on_host / (inputs.cpu_adamw * PIPELINE_SHARE), 4 * on_host / inputs.h2d)
    front = min(plan.resident_blocks or 0, stats.blocks) / stats.blocks if stats.blocks else 0.0
    forward_of_front = (1 - BACKWARD_SHARE) * compute / inputs.accumulate * front
    exposed = max(0.0, pipeline - inputs.backward_of_last - forward_of_front)
    gpu_update = on_gpu / GPU_UPDATE_RATE["adamw"]
    transfer = 4 * on_host / inputs.d2h + 4 * on_host / inputs.h2d  # fp32 gradients out, fp32 weights back
    return StepTime(compute, transfer + inputs.offload, on_host / inputs.cpu_adamw + gpu_update,
                    compute + inputs.offload_exposed + exposed + gpu_update)


def plan_variants(base: Plan, stats: ModelStats, levers: CandidateLevers) -> list[Plan]:
    """The pinned `gpu_state_blocks`, or None: `choose` sizes it to the most that fit."""
    return [dataclasses.replace(base, resident_blocks=levers.gpu_state_blocks)]


SPEC = BackendSpec(
    name="host_adam", engine=HostAdamBackend, memory_terms=memory_terms, step_time=step_time,
    checkpoint_weight_bytes=4, built_on_gpu=built_on_gpu, exact_optimizer="adamw",
    pinned_optimizer=lambda optimizer: "adamw" if optimizer in ("adamw", "cpu_adam") else None,
    own_adamw=True, needs_cuda=True, plan_variants=plan_variants, sizes_blocks_on_gpu=True,
    plan_detail=lambda plan: f", {plan.resident_blocks} blocks' state on the GPU",
    options_of=lambda plan: {"gpu_state_blocks": plan.resident_blocks}, pinned_levers=("gpu_state_blocks",),
    checkpoint_files=(CHECKPOINT_FILE,), fp32_tensors=folder_fp32_tensors,
    saved_weights=saved_weights, client_state=client_state,
)
