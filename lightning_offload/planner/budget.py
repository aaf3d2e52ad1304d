"""How much memory this process may use: what the system reports free, within the limits a job or a container sets.

A SLURM job (`--mem`), a Docker or Kubernetes memory limit, a card shared with another process or capped by
`torch.cuda.set_per_process_memory_fraction`, and the budgets a user passes all leave the job less than the machine
has. Each limit can only lower what the planner sees, never raise it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

GIB = 2**30
CUDA_CONTEXT_BYTES = int(0.6 * GIB)  # the CUDA context and cuBLAS workspaces: outside torch's allocator

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class Available:
    """Bytes a tier may still take, and what limits it (None: the memory the system reports free)."""

    bytes: int
    limit: str | None = None

    def within(self, cap_bytes: float | None, limit: str) -> Available:
        """This, or `cap_bytes` named `limit` where that is lower."""
        if cap_bytes is None or cap_bytes >= self.bytes:
            return self
        return Available(max(0, int(cap_bytes)), limit)


def host_memory_available(*, max_host_memory_gib: float | None = None) -> Available:
    """Host RAM this process may still allocate: what the system reports available, the room left under each
    cgroup memory limit above it (v1 and v2), and what `max_host_memory_gib` leaves beside what the process holds
    already (a budget is all the memory the process may hold, as on a machine or in a job with that much), whichever
    is least."""
    import psutil

    available = Available(psutil.virtual_memory().available)
    room = cgroup_memory_room()
    if room is not None:
        available = available.within(room, "the job's memory limit (cgroup)")
    if max_host_memory_gib is not None:
        available = available.within(max_host_memory_gib * GIB - _rss(),
                                     f"the budget `max_host_memory_gib={max_host_memory_gib:g}`")
    return available


_MORE_FOR_THE_JOB = "ask the job for more memory (SLURM `--mem`, the container's memory limit)"


def refuse_beyond_host_room(needed_bytes: int, available: Available, *, what: str, fix: str) -> None:
    """Refuses, before it is allocated, host memory for `what` beyond what `available` leaves this run: one error
    naming what limits it (a budget, the job's cgroup limit) and the fixes (`fix`: the engine's own lever)."""
    if needed_bytes <= available.bytes:
        return
    held = f", held there by {available.limit}" if available.limit else ""
    lift = ("free host memory" if available.limit is None else "raise `max_host_memory_gib`"
            if "max_host_memory_gib" in available.limit else _MORE_FOR_THE_JOB)
    raise MemoryError(
        f"{what} needs {needed_bytes / GIB:.1f} GiB of host memory, {(needed_bytes - available.bytes) / GIB:.1f} GiB "
        f"more than the {available.bytes / GIB:.1f} GiB this run may use{held}. {fix} Or {lift}."
    )


def gpu_memory_available(device: torch.device, *, max_gpu_memory_gib: float | None = None) -> Available:
    """GPU memory this process may still allocate on `device`: what the driver reports free (other processes'
    memory excluded) plus what this process's allocator caches, within `torch.cuda.set_per_process_memory_fraction`
    and `max_gpu_memory_gib`."""
    free, total = torch.cuda.mem_get_info(device)
    # Memory this process's allocator already caches is free for the run, though the driver counts it used.
    available = Available(free + torch.cuda.memory_reserved(device))
    fraction = _allocator_fraction(device)
    if fraction < 1:
        available = available.within(fraction * total, f"`torch.cuda.set_per_process_memory_fraction({fraction:g})`")
    if max_gpu_memory_gib is not None:
        available = available.within(max_gpu_memory_gib * GIB,
                                     f"the budget `max_gpu_memory_gib={max_gpu_memory_gib:g}`")
    return available


def cgroup_memory_room(cgroup_root: Path | None = None, proc_self_cgroup: Path | None = None) -> int | None:
    """Bytes left under the tightest memory limit of this process's cgroup and its ancestors (None: no limit).

    v2 reads `memory.max` and `memory.current`, v1 `memory.limit_in_bytes` and `memory.usage_in_bytes`. The
    cgroup's inactive page cache counts as room: the kernel reclaims it before it kills (as `docker stats` and the
    kubelet count it)."""
    use = cgroup_memory_use(cgroup_root, proc_self_cgroup)
    return None if use is None else max(0, use[1] - use[0])


def _cgroup_folders(cgroup_root: Path, proc_self_cgroup: Path) -> list[Path]:
    """This process's memory cgroup folders, from its own up to the root, for v2 (`0::/path`) and v1
    (`N:memory:/path`); inside a container the path may be `/` with the container's cgroup mounted at the root."""
    try:
        lines = proc_self_cgroup.read_text().splitlines()
    except OSError:
        return []
    folders = []
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":
            base = cgroup_root
        elif "memory" in controllers.split(","):
            base = cgroup_root / "memory"
        else:
            continue
        folder = base / path.strip("/")
        while True:
            folders.append(folder)
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return folders


def _use_in(folder: Path) -> tuple[int, int] | None:
    """(bytes the cgroup at `folder` uses beyond reclaimable cache, its limit); None: no limit there."""
    for limit_file, usage_file, inactive_key in (("memory.max", "memory.current", "inactive_file"),
                                                 ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                                  "total_inactive_file")):
        limit, usage = _read_int(folder / limit_file), _read_int(folder / usage_file)
        # v1 writes "no limit" as a number near 2**63, v2 as "max".
        if limit is None or limit >= 2**60:
            continue
        inactive = _memory_stat(folder).get(inactive_key, 0)
        return max(0, (usage or 0) - inactive), limit
    return None


def cgroup_memory_use(cgroup_root: Path | None = None, proc_self_cgroup: Path | None = None) -> tuple[int, int] | None:
    """(bytes used, limit) of the memory cgroup, among this process's and its ancestors, with the least room left;
    None: no limit."""
    folders = _cgroup_folders(cgroup_root or CGROUP_ROOT, proc_self_cgroup or PROC_SELF_CGROUP)
    uses = [use for folder in folders if (use := _use_in(folder)) is not None]
    return min(uses, key=lambda use: use[1] - use[0]) if uses else None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _memory_stat(folder: Path) -> dict[str, int]:
    try:
        lines = (folder / "memory.stat").read_text().splitlines()
    except OSError:
        return {}
    return {key: int(value) for key, value in (line.split() for line in lines if len(line.split()) == 2)}


# How close to its limit host memory may come before the run warns (once) that the kernel may kill it.
HOST_WARNING_FRACTION = 0.95


class HostBudget:
    """The host memory one run may use, followed while it runs: `room()` is what its engines may still allocate, and
    `warning_once()` warns when the process comes within 5% of what limits it (`max_host_memory_gib`, the job's
    cgroup limit), so that a user sees a kernel OOM kill coming instead of a process that vanishes. Each look reads
    the process's RSS and a few cgroup files: cheap enough for every checkpoint and epoch."""

    def __init__(self, max_host_memory_gib: float | None = None) -> None:
        self.max_host_memory_gib = max_host_memory_gib
        self.warned = False

    def room(self) -> Available:
        return host_memory_available(max_host_memory_gib=self.max_host_memory_gib)

    def warning_once(self) -> str | None:
        """The warning, the first time memory is that close (None otherwise, and ever after)."""
        if self.warned:
            return None
        message = self._closeness()
        self.warned = message is not None
        return message

    def _closeness(self) -> str | None:
        consequence = ("Beyond it the kernel kills the process without a message. Save a checkpoint and resume with "
                       "a leaner plan (a smaller batch, `activation_checkpointing='full'`, 8-bit optimizer state)")
        if self.max_host_memory_gib is not None:
            held = _rss()
            if held >= HOST_WARNING_FRACTION * self.max_host_memory_gib * GIB:
                return (f"This process holds {held / GIB:.1f} GiB of host memory, within "
                        f"{1 - HOST_WARNING_FRACTION:.0%} of the budget `max_host_memory_gib="
                        f"{self.max_host_memory_gib:g}`. {consequence}, or raise `max_host_memory_gib` where the "
                        "machine has the memory.")
        use = cgroup_memory_use()
        if use is not None and use[0] >= HOST_WARNING_FRACTION * use[1]:
            return (f"The job's memory limit (cgroup) is {use[0] / use[1]:.0%} used ({use[0] / GIB:.1f} of "
                    f"{use[1] / GIB:.1f} GiB). {consequence}, or {_MORE_FOR_THE_JOB}.")
        return None


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def cap_gpu_allocator(device: torch.device, max_gpu_memory_gib: float) -> float | None:
    """Caps torch's CUDA allocator at `max_gpu_memory_gib` less the CUDA context (which it does not count), so
    the run keeps to its budget whatever the plan's estimate missed; only ever lowers the cap. Returns the cap it
    replaced (None: nothing changed, e.g. on a CPU)."""
    if device.type != "cuda":
        return None
    device = _indexed(device)
    _, total = torch.cuda.mem_get_info(device)
    current = _allocator_fraction(device)
    fraction = max(0.0, (max_gpu_memory_gib * GIB - CUDA_CONTEXT_BYTES) / total)
    if fraction >= current:
        return None
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return current


def gpu_free_bytes(device: torch.device) -> int:
    """Bytes this process may still reserve on `device`: what the driver reports free, within the allocator's
    per-process cap (a budget's, or the user's `set_per_process_memory_fraction`)."""
    free, total = torch.cuda.mem_get_info(device)
    return max(0, min(free, int(_allocator_fraction(device) * total) - torch.cuda.memory_reserved(device)))


def _allocator_fraction(device: torch.device) -> float:
    # torch < 2.8 has no getter: a fraction set there goes unseen.
    fraction_of = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    return fraction_of(_indexed(device)) if fraction_of is not None else 1.0


def _indexed(device: torch.device) -> torch.device:
    """`device` with its index (the current device for a bare "cuda"): the allocator's fraction calls need one."""
    return device if device.index is not None else torch.device(device.type, torch.cuda.current_device())
