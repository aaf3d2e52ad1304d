"""A one-process process group, for engines that insist on `torch.distributed` even on one device.

The store is an in-memory `HashStore`, so no port is opened: a notebook can call `fit` again, and several
runs can share a machine, without port clashes or a leftover rendezvous.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

# Variables DeepSpeed reads directly (zero.Init uses LOCAL_RANK) instead of asking torch.distributed.
_SINGLE_PROCESS_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1"}


def ensure_single_process_group(device: torch.device) -> None:
    """Initialises (or reuses) a world-size-1 process group matching `device`."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError(
                f"A process group of world size {dist.get_world_size()} is already running; "
                "`single_gpu_offload` trains on one device in one process."
            )
        if dist.get_backend() == backend:
            return
        dist.destroy_process_group()
    for key, value in _SINGLE_PROCESS_ENV.items():
        os.environ.setdefault(key, value)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
