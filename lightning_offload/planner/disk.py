"""The disk a user gave for state that does not fit in host memory: is it usable, how fast, how much room.

DeepSpeed's async I/O op reads and writes its swap files with O_DIRECT (no page cache), so a path is usable only on
a filesystem that accepts O_DIRECT, and its speed is what O_DIRECT reads and writes reach with a few requests in
flight. The bandwidths are probed once per filesystem and cached beside the other ceilings; free space is read
each time (it changes between runs).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import platform
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lightning_offload.planner.cache import cache_root
from lightning_offload.planner.budget import GIB

# Bytes a probe writes and reads back: past the drive's write cache, seconds at NVMe speeds.
PROBE_BYTES = 1 * GIB
# Requests in flight and bytes per request: DeepSpeed's aio op keeps a queue of 1 MiB blocks in flight; a handful
# of 8 MiB requests from threads reaches the same plateau without the op (which needs a build).
PROBE_THREADS = 4
PROBE_REQUEST_BYTES = 8 * 2**20
DISK_PROBE_VERSION = 1


class UnusableDisk(ValueError):
    """The path given for state on disk cannot hold it: the message names the problem and the fix."""


@dataclass(frozen=True, kw_only=True)
class Disk:
    """A folder for swapped state: its O_DIRECT bandwidth and free space now."""

    path: str
    read_gbps: float
    write_gbps: float
    free_bytes: int

    @property
    def free_gib(self) -> float:
        return self.free_bytes / GIB

    def describe(self) -> str:
        return (f"{self.path} ({self.free_gib:.0f} GiB free, O_DIRECT {self.read_gbps:.2f} GB/s read, "
                f"{self.write_gbps:.2f} GB/s write)")


def check_disk_path(path: str | os.PathLike, *, option: str = "nvme_path") -> Path:
    """Refuses a folder that is missing, not a folder, not writable, or on a filesystem without O_DIRECT."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise UnusableDisk(f"`{option}={str(path)!r}` does not exist. Create the folder (on a local NVMe drive) or "
                           f"point `{option}` at one.")
    if not folder.is_dir():
        raise UnusableDisk(f"`{option}={str(path)!r}` is a file, not a folder. Point `{option}` at a folder on a "
                           "local NVMe drive.")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".lightning_offload-write-test-"):
            pass
    except OSError as error:
        raise UnusableDisk(f"`{option}={str(path)!r}` is not writable ({error.strerror}). Point `{option}` at a "
                           "folder this user can write to, on a local NVMe drive.") from None
    probe = folder / f".lightning_offload-odirect-{os.getpid()}"
    try:
        descriptor = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
        os.close(descriptor)
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise
        raise UnusableDisk(f"`{option}={str(path)!r}` is on a filesystem without O_DIRECT (which DeepSpeed's async "
                           "I/O needs to bypass the page cache). Point it at a folder on a local drive's ext4 or "
                           "xfs filesystem, not ramfs, a network or FUSE mount.") from None
    finally:
        probe.unlink(missing_ok=True)
    return folder


def check_disk_room(path: str | os.PathLike, needed_bytes: int, *, what: str, option: str = "nvme_path") -> None:
    """Refuses a folder whose filesystem has less free space than `needed_bytes` (for `what`)."""
    free = shutil.disk_usage(path).free
    if needed_bytes > free:
        raise UnusableDisk(f"`{option}={str(path)!r}` has {_size(free)} free but {what} needs {_size(needed_bytes)}. "
                           f"Free {_size(needed_bytes - free)} there or point `{option}` at a larger drive.")


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB / 10 else f"{nbytes / 2**20:.2f} MiB"


def probe_disk(path: str | os.PathLike, nbytes: int = PROBE_BYTES) -> tuple[float, float]:
    """O_DIRECT (read, write) bandwidth in GB/s of the folder's filesystem: `nbytes` written from several threads,
    synced, then read back, in a file removed afterwards."""
    folder = check_disk_path(path)
    nbytes = min(nbytes, shutil.disk_usage(folder).free // 2)  # a nearly full disk is probed, not filled
    request = min(PROBE_REQUEST_BYTES, max(mmap.PAGESIZE, nbytes // PROBE_THREADS // mmap.PAGESIZE * mmap.PAGESIZE))
    requests = max(PROBE_THREADS, nbytes // request)
    # Anonymous maps are page-aligned, as O_DIRECT needs; one buffer per thread.
    buffers = [mmap.mmap(-1, request) for _ in range(PROBE_THREADS)]
    for buffer in buffers:
        buffer.write(os.urandom(request))  # incompressible, so a compressing drive reads and writes it all
    descriptor, name = tempfile.mkstemp(dir=folder, prefix=".lightning_offload-disk-probe-")
    os.close(descriptor)
    descriptor = os.open(name, os.O_RDWR | os.O_DIRECT)

    def run(io: str) -> float:
        def worker(thread: int) -> None:
            for index in range(thread, requests, PROBE_THREADS):
                if io == "write":
                    os.pwritev(descriptor, [buffers[thread]], index * request)
                else:
                    os.preadv(descriptor, [buffers[thread]], index * request)

        start = time.perf_counter()
        with ThreadPoolExecutor(PROBE_THREADS) as pool:
            list(pool.map(worker, range(PROBE_THREADS)))
        if io == "write":
            os.fsync(descriptor)
        return requests * request / (time.perf_counter() - start) / 1e9

    try:
        write = run("write")
        read = run("read")
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        check_disk_room(folder, requests * request, what="probing its bandwidth")
        raise
    finally:
        os.close(descriptor)
        os.unlink(name)
        for buffer in buffers:
            buffer.close()
    return read, write


def _cache_path(folder: Path) -> Path:
    root = cache_root()
    # One entry per filesystem: folders on one drive share its bandwidth.
    key = "".join(c if c.isalnum() else "-" for c in f"{platform.node()}-{os.stat(folder).st_dev}")
    return root / f"disk-v{DISK_PROBE_VERSION}-{key}.json"


def load_or_probe_disk(path: str | os.PathLike) -> Disk:
    """The folder's `Disk`: bandwidths from the cache when its filesystem was probed before, else probed now and
    cached; free space as it is now. Refuses an unusable folder (`check_disk_path`)."""
    folder = check_disk_path(path)
    cache = _cache_path(folder)
    try:
        rates = json.loads(cache.read_text())
        read, write = float(rates["read_gbps"]), float(rates["write_gbps"])
    except (OSError, KeyError, TypeError, ValueError):
        read, write = probe_disk(folder)
        if shutil.disk_usage(folder).free < 2 * PROBE_BYTES:  # probed with less than the plateau needs
            return Disk(path=str(folder), read_gbps=read, write_gbps=write, free_bytes=shutil.disk_usage(folder).free)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            temporary = cache.with_suffix(".tmp")
            temporary.write_text(json.dumps({"read_gbps": read, "write_gbps": write}, indent=1))
            temporary.replace(cache)
        except OSError:
            pass  # an unwritable cache only costs the next run a probe
    return Disk(path=str(folder), read_gbps=read, write_gbps=write, free_bytes=shutil.disk_usage(folder).free)
