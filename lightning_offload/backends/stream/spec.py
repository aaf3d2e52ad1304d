"""The `stream` backend as the planner sees it: its memory and step-time terms and its candidate plans."""

from __future__ import annotations

import dataclasses

from lightning_offload.backends.spec import BackendSpec
from lightning_offload.backends.stream.backend import StreamBackend, StreamConfig
from lightning_offload.backends.stream.checkpoint import MANIFEST, fp32_tensors
from lightning_offload.planner.measure import ModelStats
from lightning_offload.planner.terms import (ADAMW_8BIT, GPU_UPDATE_RATE, OPTIMIZER_STATE_BYTES, CandidateLevers,
                                             MemoryInputs, MemoryTerms, Plan, StepInputs, StepTime)

# Blocks are streamed and recomputed one at a time: the policies that keep no block's activations whole.
POLICIES = ("full", "offload")


def memory_terms(inputs: MemoryInputs) -> MemoryTerms:
    """Resident blocks' weights on the GPU, the others' in pinned host memory passing through a ring of slots; the
    8-bit state of every trainable parameter in pinned host memory, passing through a second ring."""
    stats, plan, state_bytes = inputs.stats, inputs.plan, inputs.state_bytes
    block = stats.block_parameters
    resident = min(plan.resident_blocks, stats.blocks)
    streamed = (stats.blocks - resident) * block
    # The largest unit streamed through the rings may be the embedding or the output layer, not a block.
    largest = max(block, stats.embedding_parameters)
    gpu = {
        "bf16 weights (resident blocks, embeddings, head)": 2 * (resident * block + stats.other_parameters),
        "bf16 weight ring (three units)": 2 * StreamConfig.weight_slots * block,
        "optimizer state ring (three units)": int(StreamConfig.state_slots * state_bytes * largest),
        **inputs.gradients_updated_in_backward(max(stats.trainable_block_parameters, stats.embedding_parameters)),
    }
    host = {"bf16 weights (streamed blocks)": 2 * streamed,
            "optimizer state": int(state_bytes * stats.trainable_parameters)}
    return MemoryTerms(gpu, host, frozenset(host))


def step_time(inputs: StepInputs) -> StepTime:
    """Streamed weights come in for every pass; the state goes in and out once per step and the updated streamed
    weights go back out, both directions at once; the activation copies share the link, all of it under compute."""
    stats, plan = inputs.stats, inputs.plan
    params = stats.parameters
    streamed = (stats.blocks - min(plan.resident_blocks, stats.blocks)) * stats.block_parameters
    state = OPTIMIZER_STATE_BYTES[plan.optimizer] * params
    weights_in = inputs.accumulate * inputs.passes * 2 * streamed
    both_ways = 2 * max(state, state + 2 * streamed) / inputs.duplex
    transfer = weights_in / inputs.h2d + both_ways
    update = params / GPU_UPDATE_RATE[plan.optimizer]
    return StepTime(inputs.compute, transfer + inputs.offload, update,
                    max(inputs.compute + update, transfer + inputs.offload))


def plan_variants(base: Plan, stats: ModelStats, levers: CandidateLevers) -> list[Plan]:
    """Coarse steps of resident blocks show the trade in the table; None is sized to the most that fit (`choose`)."""
    step = max(1, stats.blocks // 8)
    return [*(dataclasses.replace(base, resident_blocks=r) for r in range(0, stats.blocks + 1, step)),
            dataclasses.replace(base, resident_blocks=None)]


def exclusion(stats: ModelStats, checkpointing: str | None) -> str | None:
    if checkpointing not in (None, *POLICIES):
        return f"it streams blocks under `full` or `offload` checkpointing, not {checkpointing!r}"
    if not stats.blocks:
        return "the model has no repeated block to stream"
    return None


SPEC = BackendSpec(
    name="stream", engine=StreamBackend, memory_terms=memory_terms, step_time=step_time, checkpoint_weight_bytes=2,
    eight_bit_optimizer="adamw8bit_fused",
    pinned_optimizer=lambda optimizer: "adamw8bit_fused" if optimizer in ADAMW_8BIT else None,
    own_adamw=True, needs_cuda=True, policies=POLICIES, exclusion=exclusion, plan_variants=plan_variants,
    sizes_blocks_on_gpu=True,
    exact_pinned_host=True,  # its pinned arenas are allocated at exactly the sizes counted here
    plan_detail=lambda plan: f", {plan.resident_blocks} resident blocks",
    options_of=lambda plan: {"resident_blocks": plan.resident_blocks},
    checkpoint_files=(MANIFEST,), fp32_tensors=fp32_tensors,
)
