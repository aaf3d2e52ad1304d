"""Which units of the model stay on the GPU, which stream from host memory, and which blocks keep their optimizer
state on disk: pure functions, no CUDA calls.

A unit is one decoder block, or one module outside the blocks (embedding, final norm, output layer). Its weights
are either resident on the GPU or live in pinned host memory and pass through a ring of GPU slots; its 8-bit AdamW
state lives in pinned host memory, or for some blocks in files under `nvme_path` (`disk.DiskTier`), and passes
through a second ring during backward. The memory planner calls `place_units` with the GPU memory it has left after
activations and fixed buffers, then `place_state_on_disk` with the host memory it has.

Memory terms (P = trained parameters, S = streamed parameters, D = parameters of the blocks whose state is on disk,
w = bytes of a weight, 2 for bf16, s = STATE_BYTES_PER_PARAM):
    GPU:  w x (P - S) resident weights
          + weight_slots x (largest streamed unit's weights) + state_slots x (largest unit's 8-bit state)
          + gradients: 2 units' worth (a unit's gradients live from its backward to its update); when gradients
            accumulate over micro-batches, the resident units' w x (P - S), kept until the step, 2 streamed units'
            worth in flight and gradient_slots x (largest streamed unit's weights) their sums pass through
    host (all pinned, in registered arenas): s x (P - D) + w x S
          + w x S when gradients accumulate: the streamed units' gradients, summed over the micro-batches
          + disk_buffers x (largest state on disk) when D > 0: the staging buffers its reads and writes go through
    disk: s x D, read once and written once per optimizer step (during the last micro-batch's backward)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lightning_offload.kernels.format import BLOCK_SIZE, RECORD_BYTES
from lightning_offload.planner.budget import GIB

STATE_BYTES_PER_PARAM = RECORD_BYTES / BLOCK_SIZE  # 2.0625: m and v codes, two fp32 scales per 256 elements
GRADIENT_UNITS_ALIVE = 2  # a unit's gradients wait for its update while the next unit's backward runs
GRADIENT_SLOTS = 3  # accumulating: one streamed unit's sum drains to the host, one is added to, one loads ahead
DISK_PAGE = 4096  # O_DIRECT moves whole pages: each block's state file and staging buffer is rounded up to one
DISK_BUFFERS = 4  # staging buffers: one per state slot (3) holding a block on its way to its update, one more free


@dataclass(frozen=True)
class UnitSize:
    weight_bytes: int
    state_bytes: int
    is_block: bool
    can_stream: bool = True
    """False for units of several modules that share weights (a tied embedding and output layer)."""


@dataclass(frozen=True)
class Placement:
    streamed: frozenset[int]
    """Indices of the units whose weights live in host memory."""
    gpu_bytes: int
    """Resident weights, both rings and live gradients: what the plan needs besides activations."""
    host_pinned_bytes: int
    """Optimizer state of every unit and the weights of the streamed units."""
    ring_weight_bytes: int
    ring_state_bytes: int
    on_disk: frozenset[int] = frozenset()
    """Indices of the blocks whose optimizer state lives in files under `nvme_path`."""
    disk_bytes: int = 0
    staging_bytes: int = 0
    """Pinned staging buffers of the disk tier (counted in `host_pinned_bytes`)."""
    ring_gradient_bytes: int = 0
    """Accumulating: each GPU slot the streamed units' gradient sums pass through."""
    host_gradient_bytes: int = 0
    """Accumulating: the streamed units' gradient sums in host memory (counted in `host_pinned_bytes`)."""

    def resident_blocks(self, units: Sequence[UnitSize]) -> int:
        return sum(1 for i, u in enumerate(units) if u.is_block and i not in self.streamed)


def spread(count: int, total: int) -> list[int]:
    """`count` of `total` positions, evenly spaced, so streamed blocks sit between resident ones and each one's
    copies overlap the compute of its resident neighbours."""
    if count <= 0:
        return []
    return sorted({min(total - 1, int((i + 0.5) * total / count)) for i in range(count)})


def page_rounded(nbytes: int) -> int:
    return -(-nbytes // DISK_PAGE) * DISK_PAGE


def measure(units: Sequence[UnitSize], streamed: frozenset[int], *, weight_slots: int, state_slots: int,
            accumulate: int, on_disk: frozenset[int] = frozenset(), disk_buffers: int = DISK_BUFFERS) -> Placement:
    """The memory a given choice of streamed units (and of blocks whose state is on disk) needs."""
    streamed_weights = [units[i].weight_bytes for i in streamed]
    ring_weight = max(streamed_weights, default=0)
    ring_state = max((u.state_bytes for u in units), default=0)
    resident = sum(u.weight_bytes for i, u in enumerate(units) if i not in streamed)
    largest = sorted((u.weight_bytes for u in units), reverse=True)
    gradients = sum(largest[:GRADIENT_UNITS_ALIVE])
    ring_gradient = host_gradients = 0
    if accumulate > 1:  # the resident units' gradients kept; the streamed units' in flight to their sums
        ring_gradient, host_gradients = ring_weight, sum(streamed_weights)
        in_flight = sum(sorted(streamed_weights, reverse=True)[:GRADIENT_UNITS_ALIVE])
        gradients = resident + in_flight + GRADIENT_SLOTS * ring_gradient
    gpu = resident + weight_slots * ring_weight + state_slots * ring_state + gradients
    disk = sum(page_rounded(units[i].state_bytes) for i in on_disk)
    staging = disk_buffers * max((page_rounded(units[i].state_bytes) for i in on_disk), default=0) if on_disk else 0
    host = (sum(u.state_bytes for i, u in enumerate(units) if i not in on_disk) + sum(streamed_weights) + staging
            + host_gradients)
    return Placement(frozenset(streamed), gpu, host, ring_weight, ring_state, frozenset(on_disk), disk, staging,
                     ring_gradient, host_gradients)


def place_units(units: Sequence[UnitSize], *, gpu_free_bytes: int, weight_slots: int = 3, state_slots: int = 3,
                accumulate: int = 1, resident_blocks: int | None = None, stream_outer: bool = False) -> Placement:
    """The placement that keeps the most blocks resident within `gpu_free_bytes`.

    `gpu_free_bytes` is the GPU memory left after activations, the loss and fixed buffers. `resident_blocks` pins
    the count instead of choosing it. Units outside the blocks stream only when `stream_outer` is set or when even
    streaming every block does not fit. Raises `MemoryError` naming the shortfall when nothing fits.
    """
    blocks = [i for i, u in enumerate(units) if u.is_block]
    outer = sorted((i for i, u in enumerate(units) if not u.is_block and u.can_stream),
                   key=lambda i: -units[i].weight_bytes)

    def with_blocks_streamed(count: int, outer_streamed: Sequence[int]) -> Placement:
        chosen = {blocks[j] for j in spread(count, len(blocks))} | set(outer_streamed)
        return measure(units, frozenset(chosen), weight_slots=weight_slots, state_slots=state_slots,
                       accumulate=accumulate)

    base_outer = outer if stream_outer else []
    if resident_blocks is not None:
        if not 0 <= resident_blocks <= len(blocks):
            raise ValueError(f"`resident_blocks={resident_blocks}`: the model has {len(blocks)} blocks.")
        return with_blocks_streamed(len(blocks) - resident_blocks, base_outer)
    for count in range(len(blocks) + 1):
        placement = with_blocks_streamed(count, base_outer)
        if placement.gpu_bytes <= gpu_free_bytes:
            return placement
    for extra in range(len(outer) + 1):
        placement = with_blocks_streamed(len(blocks), outer[: max(extra, len(base_outer))])
        if placement.gpu_bytes <= gpu_free_bytes:
            return placement
    shortfall = (placement.gpu_bytes - gpu_free_bytes) / GIB
    gradient_slots = (f", {placement.ring_gradient_bytes / GIB:.2f} GiB per gradient slot"
                      if placement.ring_gradient_bytes else "")
    raise MemoryError(
        f"The `stream` backend needs {placement.gpu_bytes / GIB:.1f} GiB of GPU memory with every unit streamed "
        f"({placement.ring_weight_bytes / GIB:.2f} GiB per weight slot, {placement.ring_state_bytes / GIB:.2f} GiB "
        f"per state slot{gradient_slots}), {shortfall:.1f} GiB more than the {gpu_free_bytes / GIB:.1f} GiB left "
        "after activations. Fewer slots (`weight_slots`, `state_slots`) or a smaller `activation_reserve_gib` free "
        "some; else use a smaller micro-batch or a GPU with more memory."
    )


def place_state_on_disk(units: Sequence[UnitSize], placement: Placement, *, host_free_bytes: int,
                        disk_blocks: int | None = None, disk_buffers: int = DISK_BUFFERS, weight_slots: int = 3,
                        state_slots: int = 3, accumulate: int = 1) -> Placement:
    """`placement` with the optimizer state of the fewest blocks on disk that lets its pinned host memory fit in
    `host_free_bytes`, spread over the model so each block's disk reads and writes overlap its neighbours' compute;
    `disk_blocks` pins the count. When even every block's state on disk does not fit, the placement with all of it
    there (`check_host_memory` names the shortfall)."""
    blocks = [i for i, u in enumerate(units) if u.is_block and u.state_bytes]

    def with_blocks_on_disk(count: int) -> Placement:
        chosen = frozenset(blocks[j] for j in spread(count, len(blocks)))
        return measure(units, placement.streamed, weight_slots=weight_slots, state_slots=state_slots,
                       accumulate=accumulate, on_disk=chosen, disk_buffers=disk_buffers)

    if disk_blocks is not None:
        if not 0 <= disk_blocks <= len(blocks):
            raise ValueError(f"`disk_blocks={disk_blocks}`: the model has {len(blocks)} blocks with optimizer state.")
        return with_blocks_on_disk(disk_blocks)
    for count in range(len(blocks) + 1):
        candidate = with_blocks_on_disk(count)
        if candidate.host_pinned_bytes <= host_free_bytes:
            return candidate
    return candidate


def check_host_memory(placement: Placement, *, available_bytes: int, reserve_bytes: int,
                      limit: str | None = None) -> None:
    """Refuses, before anything is allocated, a plan whose pinned host memory does not fit in what is available
    (`limit`: what holds that below the machine's free memory, e.g. the budget `max_host_memory_gib`)."""
    needed = placement.host_pinned_bytes + reserve_bytes
    if needed > available_bytes:
        held = f" (held there by {limit})" if limit else ""
        lift = ("raise `max_host_memory_gib`" if limit and "max_host_memory_gib" in limit else
                "ask the job for more memory (SLURM `--mem`, the container's memory limit)" if limit else
                "free host memory")
        on_disk = (f", {len(placement.on_disk)} blocks' state on disk through {placement.staging_bytes / GIB:.1f} GiB "
                   "of staging buffers" if placement.on_disk else "")
        gradients = " and accumulated gradients" if placement.host_gradient_bytes else ""
        disk_advice = ("a smaller `disk_buffers`" if placement.on_disk else
                       "`nvme_path=...` (a folder on a local NVMe drive: the optimizer state of some blocks lives "
                       "there)")
        raise MemoryError(
            f"The `stream` backend needs {placement.host_pinned_bytes / GIB:.1f} GiB of pinned host memory "
            f"(8-bit optimizer state and the weights{gradients} of {len(placement.streamed)} streamed units{on_disk}) "
            f"plus {reserve_bytes / GIB:.1f} GiB kept free, {(needed - available_bytes) / GIB:.1f} GiB more than the "
            f"{available_bytes / GIB:.1f} GiB available{held}. Keep more blocks on the GPU (`resident_blocks`, a "
            f"smaller `activation_reserve_gib`), a smaller `host_reserve_gib`, {disk_advice}, {lift}, or use a "
            "machine with more RAM."
        )
