"""Streams, events and pinned host memory, with the CPU standing in for the device.

Three lanes: compute (the default stream), h2d and d2h (side streams). Every cross-lane dependency is an event
recorded on one lane and waited on by another. On a CPU device the lanes are one thread and events are
bookkeeping only, but every record, wait and copy is logged in the same order, so CPU tests check the schedule
(which copy waits on which event) that the GPU runs.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

COMPUTE, H2D, D2H = "compute", "h2d", "d2h"
ALIGNMENT = 256  # bytes: every tensor in an arena or a slot starts aligned for the kernel's vector loads


@dataclass(eq=False)
class Mark:
    """An event: `label` says what it marks, `lane` where it was recorded."""

    label: str
    lane: str
    event: Any = None


@dataclass(eq=False)
class Lanes:
    device: torch.device
    timing: bool = False
    """Record start and end events of every copy and update, summed per phase by `phase_seconds`."""
    log: list[tuple[str, str, str]] = field(default_factory=list)
    """(action, lane, label): 'copy', 'record', 'wait', 'update', and 'read' / 'write' with a buffer's name as the
    label (see `touch`). Cleared by `start_step`."""
    copied_bytes: dict[str, int] = field(default_factory=lambda: {H2D: 0, D2H: 0})
    """Bytes copied on each copy lane since the lanes were built (the backend's `transfer_counters`)."""

    def __post_init__(self) -> None:
        self.cuda = self.device.type == "cuda"
        self._streams = {}
        if self.cuda:
            self._streams = {COMPUTE: torch.cuda.current_stream(self.device),
                             H2D: torch.cuda.Stream(self.device), D2H: torch.cuda.Stream(self.device)}
        self._timed: dict[str, list[tuple[Any, Any]]] = defaultdict(list)

    def stream(self, lane: str) -> Any:
        return torch.cuda.stream(self._streams[lane]) if self.cuda else nullcontext()

    def record(self, lane: str, label: str) -> Mark:
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=self.timing)
            event.record(self._streams[lane])
        self.log.append(("record", lane, label))
        return Mark(label, lane, event)

    def wait(self, lane: str, mark: Mark | None) -> None:
        if mark is None or mark.lane == lane:  # one lane runs in order: nothing to wait for
            return
        if self.cuda and mark.event is not None:  # a host-side mark (disk I/O) was waited for by the host already
            self._streams[lane].wait_event(mark.event)
        self.log.append(("wait", lane, mark.label))

    def record_host(self, lane: str, label: str) -> Mark:
        """A mark of work the host saw complete (a disk read or write): no event, since nothing on the device
        comes before it; device lanes that wait on it are issued after the host saw it."""
        self.log.append(("record", lane, label))
        return Mark(label, lane)

    def host_waited(self, lane: str, mark: Mark) -> None:
        """Logs that work on host lane `lane` starts after `mark`, which the host saw complete."""
        self.log.append(("wait", lane, mark.label))

    def copy(self, lane: str, destination: torch.Tensor, source: torch.Tensor, label: str, *, reads: str,
             writes: str) -> None:
        """`reads` and `writes` name the source and destination buffers for `touch`."""
        with self.stream(lane), self.timed(lane, label):
            destination.copy_(source, non_blocking=self.cuda)
        self.copied_bytes[lane] += source.numel() * source.element_size()
        self.log.append(("copy", lane, label))
        self.touch(lane, reads=(reads,), writes=(writes,))

    def touch(self, lane: str, *, reads: tuple[str, ...] = (), writes: tuple[str, ...] = ()) -> None:
        """Logs the buffers (slots, host regions) that work on `lane` reads or writes at this point: bookkeeping
        only, so CPU tests can check that any two uses of a buffer on different lanes, one of them a write, are
        ordered by an event; a missing or misplaced event is a race on the GPU and invisible on the CPU."""
        self.log.extend(("read", lane, name) for name in reads)
        self.log.extend(("write", lane, name) for name in writes)

    def timed(self, lane: str, label: str) -> Any:
        if not (self.cuda and self.timing):
            return nullcontext()
        return _Timed(self, lane, label)

    def start_step(self) -> None:
        self.log.clear()
        self._timed.clear()

    def phase_seconds(self) -> dict[str, float]:
        """Busy seconds per phase ('h2d', 'd2h', 'update') since `start_step`; synchronises the device."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return {phase: sum(start.elapsed_time(end) for start, end in pairs) / 1e3
                for phase, pairs in self._timed.items()}

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


class _Timed:
    def __init__(self, lanes: Lanes, lane: str, label: str) -> None:
        self.lanes, self.lane = lanes, lane
        self.phase = "update" if label.startswith("update") else lane

    def __enter__(self) -> None:
        self.start = torch.cuda.Event(enable_timing=True)
        self.start.record(self.lanes._streams[self.lane])

    def __exit__(self, *exc: object) -> None:
        end = torch.cuda.Event(enable_timing=True)
        end.record(self.lanes._streams[self.lane])
        self.lanes._timed[self.phase].append((self.start, end))


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


class HostArena:
    """One host buffer, page-locked in one call, handed out in aligned pieces.

    `cudaHostRegister` over a buffer already touched is several times faster than `pin_memory()` / cudaHostAlloc
    (bench/RESULTS.md, "Figures moved out of the code"), and one registration avoids torch's pinned-block cache,
    which keeps freed pinned memory (counted as shared memory by the OOM killer) until emptied.
    """

    def __init__(self, nbytes: int, *, pin: bool) -> None:
        # Zeroing touches every page, in parallel: registering untouched pages faults them in one by one.
        self.buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8).zero_()
        self._unpin: weakref.finalize | None = None
        if pin:
            cudart = torch.cuda.cudart()
            torch.cuda.check_error(cudart.cudaHostRegister(self.buffer.data_ptr(), self.buffer.numel(), 0))
            # At `release`, or when the arena is collected with a run the user dropped, before its memory is freed.
            self._unpin = weakref.finalize(self, _unregister, self.buffer)
            self._unpin.atexit = False  # the process's exit frees it
        self._next = 0

    @property
    def pinned(self) -> bool:
        """Whether the buffer is page-locked now (until `release`)."""
        return self._unpin is not None and self._unpin.alive

    def take(self, nbytes: int) -> torch.Tensor:
        start, self._next = self._next, self._next + aligned(nbytes)
        if self._next > self.buffer.numel():
            raise RuntimeError(f"Host arena overrun: {self._next} of {self.buffer.numel()} bytes.")
        return self.buffer[start:start + nbytes]

    def release(self) -> None:
        if self._unpin is not None:
            self._unpin()
        self.buffer = torch.empty(0, dtype=torch.uint8)


def _unregister(buffer: torch.Tensor) -> None:
    torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr()))
