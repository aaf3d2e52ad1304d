"""The disk tier: the 8-bit AdamW state of some blocks in files under `nvme_path`, staged through a few pinned buffers
around each block's update inside backward, with DeepSpeed's async I/O op (libaio, O_DIRECT).

Each staging buffer has its own I/O handle, so one buffer's request completes independently of the others'; one
waiter thread per buffer only waits for its handle's request (`handle.wait()`), so the host can ask whether a read
or write is done without blocking. Every read and write is logged on a lane of its own ('disk 0', 'disk 1', ...) with
the buffers and files it touches, like the device lanes (`lanes.Lanes.touch`), so CPU tests replay the ordering:
- A block's state is read into a free buffer ahead of its update, in backward order, as far ahead as buffers allow;
  the h2d copy into a state slot is issued once the read is complete.
- After the update the d2h copy writes the state back into the same buffer; its write to the file is submitted once
  that copy is done (its event polled, so the host does not block on the device for it). The buffer is free when
  the write completes.
- A block's file is read only after its last write completed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_offload.backends.stream.lanes import HostArena, Lanes, Mark
from lightning_offload.backends.stream.units import Unit

PAGE = 4096  # O_DIRECT reads and writes whole, aligned pages
AIO_BLOCK_BYTES = 2**20  # DeepSpeed's defaults for one NVMe drive (its `aio` config): 1 MiB requests, 32 deep
AIO_QUEUE_DEPTH = 32
AIO_THREADS = 1


def page_rounded(nbytes: int) -> int:
    return -(-nbytes // PAGE) * PAGE


def aio_op() -> Any:
    """DeepSpeed's async I/O op, built on first use (it needs libaio: `apt install libaio-dev`)."""
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder
    except ImportError as error:
        raise ImportError("The `stream` backend's disk tier (`nvme_path`) reads and writes with DeepSpeed's async "
                          "I/O op: `pip install deepspeed`.") from error
    builder = AsyncIOBuilder()
    if not builder.is_compatible(verbose=False):
        raise RuntimeError("DeepSpeed's async I/O op cannot be built here: it needs libaio (`apt install "
                           "libaio-dev`, or point CFLAGS/LDFLAGS at its headers and library).")
    return builder.load(verbose=False)


@dataclass(eq=False)
class StagingBuffer:
    index: int
    tensor: torch.Tensor
    handle: Any
    unit: Unit | None = None
    state: str = "free"
    """free, reading, staged (read complete), saving (the d2h copy back into it issued), writing."""
    request: Future | None = None
    saved: Mark | None = None
    """The d2h copy that filled it for its write."""
    loaded: bool = False
    """Its state was copied into a device slot: it stays reserved until the update writes it back."""

    @property
    def name(self) -> str:
        return f"disk buffer {self.index}"

    @property
    def lane(self) -> str:
        return f"disk {self.index}"


class DiskTier:
    def __init__(self, folder: str | os.PathLike, units: list[Unit], lanes: Lanes, *, buffers: int,
                 pin: bool) -> None:
        self.units = [u for u in units if u.on_disk]
        self.lanes = lanes
        self.folder = Path(tempfile.mkdtemp(prefix="lightning_offload-stream-", dir=folder))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.folder, ignore_errors=True)
        self.blocked_seconds = 0.0
        """Seconds the host waited for a read or write to complete (the backend resets it every step)."""
        op = aio_op()
        size = max((page_rounded(u.state_bytes) for u in self.units), default=PAGE)
        self.arena = HostArena(buffers * size + PAGE, pin=pin)
        self.arena.take((-self.arena.buffer.data_ptr()) % PAGE)  # buffers start on a page, as O_DIRECT needs
        self.buffers = [StagingBuffer(i, self.arena.take(size), op.aio_handle(AIO_BLOCK_BYTES, AIO_QUEUE_DEPTH,
                                                                              False, True, AIO_THREADS))
                        for i in range(buffers)]
        self._waiter = ThreadPoolExecutor(buffers, thread_name_prefix="lightning_offload-disk")
        self._written: dict[int, Mark] = {}
        for unit in self.units:
            descriptor = os.open(self.path(unit), os.O_CREAT | os.O_RDWR, 0o600)
            try:  # reserved now, so a full disk is found at setup; unwritten pages read as zeros: fresh state
                os.posix_fallocate(descriptor, 0, page_rounded(unit.state_bytes))
            finally:
                os.close(descriptor)

    def path(self, unit: Unit) -> str:
        return str(self.folder / f"state_{unit.index:04d}.bin")

    def holding(self, unit: Unit) -> StagingBuffer | None:
        return next((b for b in self.buffers if b.unit is unit and b.state in ("reading", "staged")), None)

    # ------------------------------------------------------------------ requests
    def _submit(self, buffer: StagingBuffer, unit: Unit, *, read: bool) -> None:
        io = buffer.handle.async_pread if read else buffer.handle.async_pwrite
        # The file's whole pages: a smaller block's file is shorter than the buffer.
        if io(buffer.tensor[:page_rounded(unit.state_bytes)], self.path(unit), 0) != 0:
            raise OSError(f"The disk tier could not {'read' if read else 'write'} {self.path(unit)!r} (DeepSpeed's "
                          "async I/O).")
        file = f"file state {unit.index}"
        self.lanes.touch(buffer.lane, reads=(file,) if read else (buffer.name,),
                         writes=(buffer.name,) if read else (file,))
        buffer.request = self._waiter.submit(buffer.handle.wait)

    def _complete(self, buffer: StagingBuffer) -> None:
        """Waits for the buffer's request; a finished write frees it, a finished read stages it."""
        assert buffer.request is not None and buffer.unit is not None
        if not buffer.request.done():
            start = time.perf_counter()
            buffer.request.result()
            self.blocked_seconds += time.perf_counter() - start
        if buffer.request.result() != 1:
            raise OSError(f"The disk tier's {'read' if buffer.state == 'reading' else 'write'} of "
                          f"{self.path(buffer.unit)!r} failed (DeepSpeed's async I/O).")
        buffer.request = None
        if buffer.state == "reading":
            buffer.state = "staged"
            return
        self._written[buffer.unit.index] = self.lanes.record_host(buffer.lane, f"written {buffer.unit.index}")
        buffer.state, buffer.unit, buffer.saved = "free", None, None

    def _start_write(self, buffer: StagingBuffer, *, block: bool) -> bool:
        """Submits a saving buffer's write once its d2h copy is done; `block`: waits for that copy."""
        assert buffer.saved is not None and buffer.unit is not None
        event = buffer.saved.event
        if event is not None and not event.query():
            if not block:
                return False
            event.synchronize()
        self.lanes.host_waited(buffer.lane, buffer.saved)
        buffer.state = "writing"
        self._submit(buffer, buffer.unit, read=False)
        return True

    def poll(self) -> None:
        """Submits the writes whose d2h copies are done and frees the buffers whose writes are."""
        for buffer in self.buffers:
            if buffer.state == "saving":
                self._start_write(buffer, block=False)
            if buffer.state == "writing" and buffer.request is not None and buffer.request.done():
                self._complete(buffer)

    def _settle(self, buffer: StagingBuffer) -> None:
        """Brings the buffer to rest: its write written, its read staged."""
        if buffer.state == "saving":
            self._start_write(buffer, block=True)
        if buffer.state in ("reading", "writing"):
            self._complete(buffer)

    def _free_buffer(self, *, block: bool, nearer_than: Unit | None = None) -> StagingBuffer | None:
        """A free buffer: one that is, else (with `block`) the oldest write's once it completes, else one read ahead
        for a block that updates after `nearer_than` (the farthest first; its read is dropped)."""
        self.poll()
        free = next((b for b in self.buffers if b.state == "free"), None)
        if free is not None or not block:
            return free
        busy = [b for b in self.buffers if b.state in ("saving", "writing")]
        if busy:
            buffer = min(busy, key=lambda b: b.state != "writing")  # a write already on its way finishes first
            self._settle(buffer)
            return buffer
        ahead = [b for b in self.buffers if b.state in ("reading", "staged") and not b.loaded and b.unit is not None
                 and (nearer_than is None or b.unit.index < nearer_than.index)]
        if not ahead:
            raise RuntimeError(
                f"All {len(self.buffers)} disk buffers of the `stream` backend hold state on its way to an update: "
                "raise `disk_buffers` (at least `state_slots` + 1)."
            )
        buffer = min(ahead, key=lambda b: b.unit.index)  # type: ignore[union-attr]
        self._settle(buffer)
        buffer.state, buffer.unit = "free", None
        return buffer

    def _after_last_write(self, buffer: StagingBuffer, unit: Unit) -> None:
        """A read of `unit`'s file waits for its write in flight in another buffer, if any."""
        for other in self.buffers:
            if other.unit is unit and other.state in ("saving", "writing"):
                self._settle(other)
        written = self._written.get(unit.index)
        if written is not None and written.lane != buffer.lane:
            self.lanes.host_waited(buffer.lane, written)

    # ------------------------------------------------------------------ the scheduler's calls
    def read_ahead(self, units: list[Unit]) -> None:
        """Starts reads for the next blocks on disk (`units` in update order) while buffers are free."""
        for unit in units:
            if self.holding(unit) is not None:
                continue
            buffer = self._free_buffer(block=False)
            if buffer is None:
                return
            self._read(buffer, unit)

    def _read(self, buffer: StagingBuffer, unit: Unit) -> None:
        self._after_last_write(buffer, unit)
        buffer.unit, buffer.state, buffer.loaded = unit, "reading", False
        self._submit(buffer, unit, read=True)

    def staged(self, unit: Unit, *, block: bool) -> tuple[StagingBuffer, Mark] | None:
        """The buffer holding `unit`'s state, read completely, and the mark a copy out of it waits on; None when
        the read is not done (or, without `block`, not started for lack of a free buffer)."""
        buffer = self.holding(unit)
        if buffer is None:
            buffer = self._free_buffer(block=block, nearer_than=unit)
            if buffer is None:
                return None
            self._read(buffer, unit)
        if buffer.state == "reading":
            if not (block or buffer.request.done()):  # type: ignore[union-attr]
                return None
            self._complete(buffer)
        buffer.loaded = True
        return buffer, self.lanes.record_host(buffer.lane, f"read state {unit.index}")

    def save_buffer(self, unit: Unit) -> tuple[StagingBuffer, Mark]:
        """The buffer the updated state of `unit` is copied back into - the one it was read into, or (its state was
        still in a device slot) a free one - and the mark after which the buffer's disk requests are done."""
        buffer = self.holding(unit)
        if buffer is not None:
            self._settle(buffer)
        else:
            buffer = self._free_buffer(block=True)
            assert buffer is not None
            self._after_last_write(buffer, unit)  # the file's last write must land before this one
        buffer.unit, buffer.state = unit, "staged"
        return buffer, self.lanes.record_host(buffer.lane, f"disk buffer {buffer.index} at rest")

    def write_back(self, buffer: StagingBuffer, saved: Mark) -> None:
        """The d2h copy recorded by `saved` filled the buffer: write it to its file once that copy is done."""
        buffer.state, buffer.saved, buffer.loaded = "saving", saved, False
        self.poll()

    def flush(self) -> None:
        """Every write written and every read ahead dropped: the files hold the state."""
        for buffer in self.buffers:
            self._settle(buffer)
            buffer.state, buffer.unit, buffer.loaded = "free", None, False

    # ------------------------------------------------------------------ checkpoints
    def read(self, unit: Unit) -> torch.Tensor:
        """`unit`'s state, read from its file into a new tensor."""
        self.flush()
        buffer = self.buffers[0]
        self._read(buffer, unit)
        self._complete(buffer)
        state = buffer.tensor[:unit.state_bytes].clone()
        buffer.state, buffer.unit = "free", None
        return state

    def write(self, unit: Unit, state: torch.Tensor) -> None:
        """Replaces `unit`'s state in its file (a checkpoint being loaded)."""
        self.flush()
        buffer = self.buffers[0]
        self._after_last_write(buffer, unit)
        buffer.tensor[:unit.state_bytes].copy_(state)
        buffer.unit, buffer.state = unit, "writing"
        self._submit(buffer, unit, read=False)
        self._complete(buffer)

    def release(self) -> None:
        self.flush()
        self._waiter.shutdown()
        self.arena.release()
        self._cleanup()
