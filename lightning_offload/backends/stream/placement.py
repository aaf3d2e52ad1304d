"""Which units of the model stay on the GPU and which stream from host memory: pure functions, no CUDA calls.

A unit is one decoder block, or one module outside the blocks (embedding, final norm, output layer). Its weights
are either resident on the GPU or live in pinned host memory and pass through a ring of GPU slots; its 8-bit AdamW
state always lives in pinned host memory and passes through a second ring during backward. The memory planner
calls `place_units` with the GPU memory it has left after activations and fixed buffers.

Memory terms (P = trained parameters, S = streamed parameters, w = bytes of a weight, 2 for bf16):
    GPU:  w x (P - S) resident weights
          + weight_slots x (largest streamed unit's weights) + state_slots x (largest unit's 8-bit state)
          + gradients: 2 units' worth (a unit's gradients live from its backward to its update), or w x P when
            gradients accumulate over micro-batches
    host (all pinned, in two registered arenas): STATE_BYTES_PER_PARAM x P + w x S
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lightning_offload.kernels.format import BLOCK_SIZE, RECORD_BYTES
from lightning_offload.planner.budget import GIB

STATE_BYTES_PER_PARAM = RECORD_BYTES / BLOCK_SIZE  # 2.0625: m and v codes, two fp32 scales per 256 elements
GRADIENT_UNITS_ALIVE = 2  # a unit's gradients wait for its update while the next unit's backward runs


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

    def resident_blocks(self, units: Sequence[UnitSize]) -> int:
        return sum(1 for i, u in enumerate(units) if u.is_block and i not in self.streamed)


def spread(count: int, total: int) -> list[int]:
    """`count` of `total` positions, evenly spaced, so streamed blocks sit between resident ones and each one's
    copies overlap the compute of its resident neighbours."""
    if count <= 0:
        return []
    return sorted({min(total - 1, int((i + 0.5) * total / count)) for i in range(count)})


def measure(units: Sequence[UnitSize], streamed: frozenset[int], *, weight_slots: int, state_slots: int,
            accumulate: int) -> Placement:
    """The memory a given choice of streamed units needs."""
    streamed_weights = [units[i].weight_bytes for i in streamed]
    ring_weight = max(streamed_weights, default=0)
    ring_state = max((u.state_bytes for u in units), default=0)
    resident = sum(u.weight_bytes for i, u in enumerate(units) if i not in streamed)
    largest = sorted((u.weight_bytes for u in units), reverse=True)
    gradients = sum(u.weight_bytes for u in units) if accumulate > 1 else sum(largest[:GRADIENT_UNITS_ALIVE])
    gpu = resident + weight_slots * ring_weight + state_slots * ring_state + gradients
    host = sum(u.state_bytes for u in units) + sum(streamed_weights)
    return Placement(frozenset(streamed), gpu, host, ring_weight, ring_state)


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
    advice = ("accumulate over fewer micro-batches (`accumulate_grad_batches=1` keeps no gradients between them)"
              if accumulate > 1 else "use a smaller micro-batch or a GPU with more memory")
    raise MemoryError(
        f"The `stream` backend needs {placement.gpu_bytes / GIB:.1f} GiB of GPU memory with every unit streamed "
        f"({placement.ring_weight_bytes / GIB:.2f} GiB per weight slot, {placement.ring_state_bytes / GIB:.2f} GiB "
        f"per state slot), {shortfall:.1f} GiB more than the {gpu_free_bytes / GIB:.1f} GiB left after activations. "
        f"Fewer slots (`weight_slots`, `state_slots`) or a smaller `activation_reserve_gib` free some; else {advice}."
    )


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
        raise MemoryError(
            f"The `stream` backend needs {placement.host_pinned_bytes / GIB:.1f} GiB of pinned host memory "
            f"(8-bit optimizer state of every parameter and the weights of {len(placement.streamed)} streamed units) "
            f"plus {reserve_bytes / GIB:.1f} GiB kept free, {(needed - available_bytes) / GIB:.1f} GiB more than the "
            f"{available_bytes / GIB:.1f} GiB available{held}. Keep more blocks on the GPU (`resident_blocks`, a "
            f"smaller `activation_reserve_gib`), a smaller `host_reserve_gib`, {lift}, or use a machine with more RAM."
        )
