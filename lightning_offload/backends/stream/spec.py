"""The `stream` backend as the planner sees it: its memory and step-time terms and its candidate plans."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from lightning_offload.backends.spec import BackendSpec
from lightning_offload.backends.stream.backend import StreamBackend, StreamConfig
from lightning_offload.backends.stream.checkpoint import MANIFEST, client_state, fp32_tensors, saved_weights
from lightning_offload.backends.stream.placement import DISK_BUFFERS, GRADIENT_SLOTS, page_rounded
from lightning_offload.planner.measure import ModelStats
from lightning_offload.planner.terms import (ADAMW_8BIT, GPU_UPDATE_RATE, OPTIMIZER_STATE_BYTES, CandidateLevers,
                                             MemoryInputs, MemoryTerms, Plan, StepInputs, StepTime, compute_weights)

# Blocks are streamed and recomputed one at a time: the policies that keep no block's activations whole.
POLICIES = ("full", "offload")


def disk_tier_bytes(block_state_bytes: int, disk_blocks: int, *,
                    disk_buffers: int = DISK_BUFFERS) -> tuple[int, int]:
    """(bytes of optimizer state moved from host memory to disk, pinned staging bytes) of `disk_blocks` blocks."""
    if not disk_blocks:
        return 0, 0
    return page_rounded(block_state_bytes) * disk_blocks, page_rounded(block_state_bytes) * disk_buffers


def disk_seconds(state_on_disk_bytes: int, *, read_gbps: float, write_gbps: float,
                 backward_seconds: float) -> tuple[float, int, int]:
    """(seconds the step waits for the disk, bytes read, bytes written) per optimizer step: each block's state on
    disk is read ahead and written back once, both under the last backward's compute, on one drive."""
    busy = state_on_disk_bytes / (read_gbps * 1e9) + state_on_disk_bytes / (write_gbps * 1e9)
    return max(0.0, busy - backward_seconds), state_on_disk_bytes, state_on_disk_bytes


def memory_terms(inputs: MemoryInputs) -> MemoryTerms:
    """Resident blocks' weights on the GPU, the others' in pinned host memory passing through a ring of slots; the
    8-bit state of every trainable parameter in pinned host memory, passing through a second ring, or for
    `disk_blocks` blocks in files on disk, read and written through pinned staging buffers. Accumulating, the
    resident units' gradients stay on the GPU and the streamed blocks' are summed in pinned host memory through a
    third ring."""
    stats, plan, state_bytes = inputs.stats, inputs.plan, inputs.state_bytes
    block = stats.block_parameters
    resident = min(plan.resident_blocks, stats.blocks)
    streamed = (stats.blocks - resident) * block
    # The largest unit streamed through the rings may be the embedding or the output layer, not a block.
    largest = max(block, stats.embedding_parameters)
    weights, size = inputs.weights
    gpu = {
        f"{weights} weights (resident blocks, embeddings, head)": size * (resident * block + stats.other_parameters),
        f"{weights} weight ring (three units)": size * StreamConfig.weight_slots * block,
        "optimizer state ring (three units)": int(StreamConfig.state_slots * state_bytes * largest),
        f"{weights} gradients (in flight)": 2 * size * max(stats.trainable_block_parameters,
                                                            stats.embedding_parameters),
    }
    host = {f"{weights} weights (streamed blocks)": size * streamed,
            "optimizer state": int(state_bytes * stats.trainable_parameters)}
    if inputs.whole_gradients:  # accumulating: streamed blocks' gradients are summed in host memory
        summed = (stats.blocks - resident) * stats.trainable_block_parameters
        gpu[f"{weights} gradients (resident units, kept until the step)"] = size * (stats.trainable_parameters - summed)
        if summed:
            gpu[f"{weights} gradient slots (three units)"] = size * GRADIENT_SLOTS * block
            host[f"{weights} gradients (streamed blocks, summed over micro-batches)"] = size * summed
    disk = {}
    moved, staging = disk_tier_bytes(int(state_bytes * stats.trainable_block_parameters), plan.disk_blocks or 0)
    if moved:
        host["optimizer state"] -= moved
        host["disk staging buffers"] = staging
        disk["8-bit optimizer state (blocks on disk)"] = moved
    return MemoryTerms(gpu, host, frozenset(host), disk)


def step_time(inputs: StepInputs) -> StepTime:
    """Streamed weights come in for every pass; the state goes in and out once per step and the updated streamed
    weights go back out, both directions at once; the activation copies share the link, all of it under compute."""
    stats, plan = inputs.stats, inputs.plan
    params = stats.parameters
    streamed_blocks = stats.blocks - min(plan.resident_blocks, stats.blocks)
    streamed = streamed_blocks * stats.block_parameters
    state = OPTIMIZER_STATE_BYTES[plan.optimizer] * params
    size = compute_weights(stats.precision)[1]
    # Each micro-batch after the first loads the streamed blocks' gradient sums back to add to.
    summed_in = (inputs.accumulate - 1) * size * streamed_blocks * stats.trainable_block_parameters
    weights_in = inputs.accumulate * inputs.passes * size * streamed + summed_in
    both_ways = 2 * max(state, state + size * streamed) / inputs.duplex
    transfer = weights_in / inputs.h2d + both_ways
    update = params / GPU_UPDATE_RATE[plan.optimizer]
    total = max(inputs.compute + update, transfer + inputs.offload)
    if not plan.disk_blocks:
        return StepTime(inputs.compute, transfer + inputs.offload, update, total)
    if inputs.disk is None:
        raise ValueError(f"The plan {plan} keeps state on disk: pass the `Disk` it uses (`load_or_probe_disk`).")
    moved, _ = disk_tier_bytes(int(OPTIMIZER_STATE_BYTES[plan.optimizer] * stats.trainable_block_parameters),
                               plan.disk_blocks)
    waited, reads, writes = disk_seconds(moved, read_gbps=inputs.disk.read_gbps, write_gbps=inputs.disk.write_gbps,
                                         backward_seconds=inputs.backward_of_last)
    return StepTime(inputs.compute, transfer + inputs.offload, update, total + waited, waited, reads, writes)


def plan_variants(base: Plan, stats: ModelStats, levers: CandidateLevers) -> list[Plan]:
    """Coarse steps of resident blocks show the trade in the table; None is sized to the most that fit (`choose`)."""
    step = max(1, stats.blocks // 8)
    plans = [*(dataclasses.replace(base, resident_blocks=r) for r in range(0, stats.blocks + 1, step)),
             dataclasses.replace(base, resident_blocks=None)]
    if levers.disk_given:  # None: the fewest blocks' state on disk that lets host memory hold the rest (`choose`)
        plans.append(dataclasses.replace(base, resident_blocks=None, disk_blocks=levers.disk_blocks))
    return plans


def fewest_blocks_on_disk(stats: ModelStats, plan: Plan, missing: Callable[[Plan], dict[str, float]]) -> Plan:
    """`plan` with the fewest blocks' state on disk that leaves host memory no shortfall (`missing` gives a plan's
    shortfall per tier); when none does, the nearest miss. Unless pinned, its resident blocks are the most the GPU
    holds: each one also frees host memory, and the disk takes the rest."""
    if plan.resident_blocks is None:
        sized_on_gpu = [dataclasses.replace(plan, resident_blocks=count, disk_blocks=0)
                        for count in range(stats.blocks + 1)]
        plan = next((p for p in reversed(sized_on_gpu) if "GPU" not in missing(p)), sized_on_gpu[0])
    sized = [dataclasses.replace(plan, disk_blocks=count) for count in range(stats.blocks + 1)]
    fitting = next((p for p in sized if "host RAM" not in missing(p)), None)
    return fitting if fitting is not None else min(sized, key=lambda p: sum(missing(p).values()))


def exclusion(stats: ModelStats, checkpointing: str | None) -> str | None:
    if checkpointing not in (None, *POLICIES):
        return f"it streams blocks under `full` or `offload` checkpointing, not {checkpointing!r}"
    if not stats.blocks:
        return "the model has no repeated block to stream"
    return None


def plan_detail(plan: Plan) -> str:
    on_disk = f", {plan.disk_blocks} blocks' state on NVMe" if plan.disk_blocks else ""
    return f", {plan.resident_blocks} resident blocks{on_disk}"


SPEC = BackendSpec(
    name="stream", engine=StreamBackend, memory_terms=memory_terms, step_time=step_time, checkpoint_weight_bytes=2,
    eight_bit_optimizer="adamw8bit_fused",
    pinned_optimizer=lambda optimizer: "adamw8bit_fused" if optimizer in ADAMW_8BIT else None,
    own_adamw=True, needs_cuda=True, policies=POLICIES, exclusion=exclusion, plan_variants=plan_variants,
    sizes_blocks_on_gpu=True, sizes_blocks_on_disk=fewest_blocks_on_disk,
    exact_pinned_host=True,  # its pinned arenas are allocated at exactly the sizes counted here
    plan_detail=plan_detail,
    options_of=lambda plan: {"resident_blocks": plan.resident_blocks, "disk_blocks": plan.disk_blocks},
    pinned_levers=("nvme_path", "disk_blocks"),
    checkpoint_files=(MANIFEST,), fp32_tensors=fp32_tensors, saved_weights=saved_weights,
    client_state=client_state,
)
