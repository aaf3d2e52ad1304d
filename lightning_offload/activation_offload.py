"""`activation_checkpointing="offload"`: each block's saved activations go to pinned host memory during forward and
come back ahead of its backward, both copies on side CUDA streams so that they run under compute.

torch's `torch.autograd.graph.save_on_cpu` copies on the compute stream in both directions (every copy adds to the
step), allocates host memory on every save, and copies weights too; these `saved_tensors_hooks` fill that gap with
side streams, a prefetch one block ahead in backward, and a pool of pinned buffers reused across steps.

A step, with blocks 0..n-1 in forward order (the tensors one block saves are one `_Group`):
- Forward: when block i starts, block i-1's saved tensors start for the host on the d2h stream, and block i-2's,
  copied by then, leave the device. The last block's tensors are never copied, the one before's are kept too:
  backward starts with them.
- Backward: the first unpack of block i's tensors (its backward starting) sends block i-1's tensors back on the
  h2d stream, so they arrive while block i's backward computes.
- Kept on the device as they are: parameters and buffers and views of them (weights, not activations), tensors
  under `min_bytes` (not worth a copy), and tensors whose layout has gaps (e.g. expanded ones).
On a CPU the same path runs with streams and events left out (a tensor is copied into a host buffer of the pool
and back), so tests check the copy order and the pool on any machine.

Synchronisation:
- d2h waits on compute before copying a group out. Compute waits on that copy before the group's device tensors
  are dropped (`_free_device_copies`), so the memory they free on the compute stream is reused only after the copy.
- A tensor coming back is allocated on the compute stream (backward frees it there, in order with compute); h2d
  first waits on compute (that memory may have been freed by compute work still queued) and on the group's d2h
  event (the host copy is complete); compute waits on the h2d event before it reads the group.
- A host buffer returns to the pool with the event of the h2d copy that read it; the d2h copy that writes it next
  waits on that event.
"""

from __future__ import annotations

import threading
import weakref
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from lightning_offload.planner.budget import Available, HostBudget

PENDING, COPYING, OFFLOADED, BROUGHT_BACK, KEPT = "pending", "copying", "offloaded", "brought back", "kept"


@dataclass(eq=False)
class HostBuffer:
    memory: torch.Tensor
    """uint8, pinned when it serves a CUDA device."""
    free_after: Any = None
    """The event of the last copy that read it (None: nothing to wait for)."""


class HostPool:
    """Host buffers by size in bytes, reused across steps. Each is page-locked with `cudaHostRegister` (faster than
    torch's `pin_memory`: see `backends/stream/lanes.HostArena`) at its exact size (torch's pinned-block cache rounds
    up to a power of two and never gives memory back). The pool holds at most the most bytes ever in use at once
    (one forward's offloaded activations): a new size evicts free buffers beyond that. `room`: the host memory the
    run may still use when the pool starts (its budget, the job's cgroup limit); the pool refuses to grow beyond it,
    naming the limit, instead of being killed by the kernel."""

    def __init__(self, *, pin: bool, room: Available | None = None) -> None:
        self.pin = pin
        self.room = room
        self.allocations = 0
        self.in_use_bytes = self.free_bytes = self.high_water_bytes = 0
        self._free: dict[int, list[HostBuffer]] = defaultdict(list)
        # Buffers come back from the autograd thread and from garbage collection, possibly inside `take`.
        self._lock = threading.RLock()

    def take(self, nbytes: int) -> HostBuffer:
        with self._lock:
            self.in_use_bytes += nbytes
            self.high_water_bytes = max(self.high_water_bytes, self.in_use_bytes)
            if self._free[nbytes]:
                self.free_bytes -= nbytes
                return self._free[nbytes].pop()
            self.allocations += 1
            while self.free_bytes + self.in_use_bytes > self.high_water_bytes:
                size = max(s for s, buffers in self._free.items() if buffers)
                evicted = self._free[size].pop()
                if evicted.free_after is not None:
                    evicted.free_after.synchronize()  # a copy may still read it
                self.free_bytes -= size
            if self.room is not None and self.free_bytes + self.in_use_bytes > self.room.bytes:
                self._refuse_growth(nbytes)
        return HostBuffer(_host_memory(nbytes, pin=self.pin))

    def _refuse_growth(self, nbytes: int) -> None:
        from lightning_offload.planner.budget import refuse_beyond_host_room

        held = self.free_bytes + self.in_use_bytes
        self.in_use_bytes -= nbytes
        refuse_beyond_host_room(
            held, self.room, what="Offloading activations to host memory (`activation_checkpointing='offload'`)",
            fix="Use `activation_checkpointing='full'` (recomputes activations instead of keeping them) or a smaller "
                "batch.",
        )

    def give(self, buffer: HostBuffer, free_after: Any) -> None:
        with self._lock:
            buffer.free_after = free_after
            nbytes = buffer.memory.numel()
            self.in_use_bytes -= nbytes
            self.free_bytes += nbytes
            self._free[nbytes].append(buffer)


def _host_memory(nbytes: int, *, pin: bool) -> torch.Tensor:
    memory = torch.empty(nbytes, dtype=torch.uint8)
    if pin:
        memory.zero_()  # touches every page, in parallel: registering untouched pages faults them in one by one
        cudart = torch.cuda.cudart()
        torch.cuda.check_error(cudart.cudaHostRegister(memory.data_ptr(), nbytes, 0))
        unregister = weakref.finalize(memory, cudart.cudaHostUnregister, memory.data_ptr())
        unregister.atexit = False  # at exit the process's memory goes anyway
    return memory


class _Saved:
    """What autograd holds for one offloaded tensor: the device tensor until its host copy is known complete, a host
    buffer from the copy's start until the copy back, then the tensor brought back."""

    __slots__ = ("group", "device_tensor", "size", "stride", "dtype", "device", "host", "pool", "restored",
                 "__weakref__")

    def __init__(self, group: _Group, tensor: torch.Tensor) -> None:
        self.group = group
        self.device_tensor: torch.Tensor | None = tensor
        self.size, self.stride, self.dtype, self.device = tensor.size(), tensor.stride(), tensor.dtype, tensor.device
        self.host: HostBuffer | None = None
        self.pool: HostPool | None = None
        self.restored: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return self.size.numel() * self.dtype.itemsize

    def host_view(self) -> torch.Tensor:
        assert self.host is not None
        return self.host.memory.view(self.dtype).as_strided(self.size, self.stride)

    def tensor(self) -> torch.Tensor:
        tensor = self.device_tensor if self.device_tensor is not None else self.restored
        assert tensor is not None, "a saved activation was read before it was brought back"
        return tensor

    def release_host(self, free_after: Any) -> None:
        if self.host is not None and self.pool is not None:
            self.pool.give(self.host, free_after)
        self.host = None

    def __del__(self) -> None:
        # Dropped unread (its graph was dropped). The buffer's last access was a d2h copy, which the next d2h copy
        # into it follows in stream order; a copy back still writing the device memory must finish before compute
        # reuses that memory.
        if self.restored is not None and not self.group.in_backward and self.group.copied_back is not None:
            torch.cuda.current_stream(self.device).wait_event(self.group.copied_back)
        self.release_host(None)


class _Group:
    """The tensors one block's forward saved, linked to the block that ran before it (for the prefetch)."""

    def __init__(self, block_index: int, previous: _Group | None) -> None:
        self.block_index = block_index
        self.previous = previous
        self.state = PENDING
        self.in_backward = False
        self.saved: list[weakref.ref[_Saved]] = []
        self.by_key: dict[tuple[Any, ...], weakref.ref[_Saved]] = {}
        self.device: torch.device | None = None
        self.copied_out: Any = None
        self.copied_back: Any = None

    def live(self) -> list[_Saved]:
        return [s for s in (ref() for ref in self.saved) if s is not None]

    def links_the_chain(self) -> bool:
        """Whether the next block's group should point here: it holds live tensors of a graph (a dropped graph's
        group must not keep older groups alive), or it saved nothing and passes its own link on."""
        return bool(self.live()) or (not self.saved and self.previous is not None)


class ActivationOffloader:
    """The `saved_tensors_hooks` of `activation_checkpointing="offload"`, shared by all blocks of one model (`run`
    wraps each block's forward). `trace`, when set to a list, records ('copy out' | 'backward' | 'copy back', block
    index, how) in order, for tests."""

    def __init__(self, *, min_bytes: int) -> None:
        self.min_bytes = min_bytes
        self.pool: HostPool | None = None
        self.host_budget: HostBudget | None = None
        """The run's host budget (set by the strategy), which the pool keeps to."""
        self.packed_bytes = 0
        """Bytes of every tensor a block saved (each save counted)."""
        self.offloaded_bytes = 0
        """Bytes whose device memory was freed once their host copy was complete."""
        self.copied_out_bytes = self.copied_back_bytes = 0
        """Bytes copied to host memory, and back to the device (telemetry's transfer counts)."""
        self.trace: list[tuple[str, int, str]] | None = None
        self._pending: _Group | None = None
        self._copying: _Group | None = None
        self._streams: dict[torch.device, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}

    def run(self, block: nn.Module, block_index: int, forward: Any, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        group = self._open(block_index)
        weights = {t.data_ptr() for t in (*block.parameters(), *block.buffers())}

        def pack(tensor: torch.Tensor) -> Any:
            return self._pack(group, weights, tensor)

        with torch.autograd.graph.saved_tensors_hooks(pack, self._unpack):
            return forward(*args, **kwargs)

    # ---------------------------------------------------------------- forward
    def _open(self, block_index: int) -> _Group:
        """Block i starts: block i-1's tensors start for the host, block i-2's (copied by now) leave the device."""
        previous, done = self._pending, self._copying
        if previous is not None:
            self._send_out(previous)
        self._copying = previous
        if done is not None and done.state == COPYING:
            self._free_device_copies(done)
        linked = previous if previous is not None and previous.links_the_chain() else None
        self._pending = _Group(block_index, linked)
        return self._pending

    def _pack(self, group: _Group, weights: set[int], tensor: torch.Tensor) -> Any:
        nbytes = tensor.numel() * tensor.element_size()
        self.packed_bytes += nbytes
        if isinstance(tensor, nn.Parameter):
            # As autograd saves a leaf: the object itself, whose storage an engine may swap (ZeRO-3 gathers).
            return tensor
        if (group.state != PENDING or type(tensor) is not torch.Tensor or nbytes == 0 or nbytes < self.min_bytes
                or tensor.device.type not in ("cuda", "cpu") or tensor.data_ptr() in weights
                or not _dense(tensor)):
            return tensor.detach()  # not the tensor: a saved output would hold its own graph node (a cycle)
        # A tensor several operations save (a norm's input, an activation's output) is copied once.
        key = (tensor.data_ptr(), tensor.device, tensor.dtype, tensor.size(), tensor.stride(), tensor._version)
        known = group.by_key.get(key)
        saved = known() if known is not None else None
        if saved is None:
            saved = _Saved(group, tensor.detach())
            group.saved.append(weakref.ref(saved))
            group.by_key[key] = weakref.ref(saved)
        return saved

    def _send_out(self, group: _Group) -> None:
        """Copies a group to host memory on the d2h stream, after the compute that produced it."""
        group.state = COPYING
        group.by_key.clear()
        saved = group.live()
        if not saved:
            return
        self._log("copy out", group.block_index)
        device = group.device = saved[0].device
        streams = self._side_streams(device)
        pool = self._host_pool(device)
        if streams:
            streams[0].wait_stream(torch.cuda.current_stream(device))
        with torch.no_grad(), torch.cuda.stream(streams[0]) if streams else nullcontext():
            for item in saved:
                item.host, item.pool = pool.take(item.nbytes), pool
                if streams and item.host.free_after is not None:
                    streams[0].wait_event(item.host.free_after)
                item.host_view().copy_(item.tensor(), non_blocking=bool(streams))
                self.copied_out_bytes += item.nbytes
            group.copied_out = streams[0].record_event() if streams else None

    def _free_device_copies(self, group: _Group) -> None:
        """Drops a copied group's device tensors. Compute waits on the copy first, so their memory, freed on the
        compute stream, is reused only after the copy read it. (`record_stream` would not do: the allocator would
        hold the memory until the copy is done in real time, and a CPU running ahead would allocate anew meanwhile.)
        The wait also paces forward: at most two blocks' activations are on the device, and when copies are slower
        than compute, forward runs at the copies' pace."""
        group.state = OFFLOADED
        if group.copied_out is not None:
            torch.cuda.current_stream(group.device).wait_event(group.copied_out)
        for item in group.live():
            item.device_tensor = None
            self.offloaded_bytes += item.nbytes

    # ---------------------------------------------------------------- backward
    def _unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        group = packed.group
        if not group.in_backward:
            self._start_backward(group)
        return packed.tensor()

    def _start_backward(self, group: _Group) -> None:
        """The block's backward starts: its tensors must be on the device, and the previous block's start back."""
        group.in_backward = True
        self._log("backward", group.block_index)
        if group.state in (PENDING, COPYING):  # the forward's last blocks: still on the device
            group.state = KEPT
            for item in group.live():
                item.release_host(None)  # only the d2h stream touched it, and writes it next in order
            self._pending = None if self._pending is group else self._pending
            self._copying = None if self._copying is group else self._copying
        elif group.state == OFFLOADED:  # not prefetched (the block before it saved nothing to copy)
            self._bring_back(group, "on demand")
        if group.copied_back is not None:
            torch.cuda.current_stream(group.device).wait_event(group.copied_back)
        previous, group.previous = group.previous, None
        if previous is not None and previous.state == OFFLOADED:
            self._bring_back(previous, "prefetch")

    def _bring_back(self, group: _Group, how: str) -> None:
        group.state = BROUGHT_BACK
        saved = [s for s in group.live() if s.host is not None]
        if not saved:
            return
        self._log("copy back", group.block_index, how)
        device = group.device
        streams = self._side_streams(device)
        # Allocated on the compute stream, which frees them as backward reads them.
        for item in saved:
            item.restored = torch.empty_strided(item.size, item.stride, dtype=item.dtype, device=device)
        if streams:
            # That memory may have been freed by compute work still queued; the host copy must be complete.
            streams[1].wait_stream(torch.cuda.current_stream(device))
            streams[1].wait_event(group.copied_out)
        with torch.no_grad(), torch.cuda.stream(streams[1]) if streams else nullcontext():
            for item in saved:
                item.restored.copy_(item.host_view(), non_blocking=bool(streams))
                self.copied_back_bytes += item.nbytes
            group.copied_back = streams[1].record_event() if streams else None
        for item in saved:
            item.release_host(group.copied_back)

    # ---------------------------------------------------------------- helpers
    def _side_streams(self, device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream] | None:
        """(d2h, h2d) streams of a CUDA device; None on a CPU."""
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._streams[device]

    def _host_pool(self, device: torch.device) -> HostPool:
        if self.pool is None:
            # The budget's room is taken when the first activations leave: after the engine's own host memory.
            room = self.host_budget.room() if self.host_budget is not None else None
            self.pool = HostPool(pin=device.type == "cuda", room=room)
        return self.pool

    def _log(self, what: str, block_index: int, how: str = "") -> None:
        if self.trace is not None:
            self.trace.append((what, block_index, how))


def _dense(tensor: torch.Tensor) -> bool:
    """Whether the elements fill their storage span without gaps or overlap, in any order of dimensions: then a
    host buffer of the same strides holds them and each copy is one DMA transfer."""
    if tensor.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(tensor.stride(), tensor.size()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True
