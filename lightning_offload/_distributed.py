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
    """Initialises (or reuses) a world-size-1 process group that serves both CPU and CUDA tensors.

    One group for the life of the process: engines keep references to it, so a notebook that trains on the GPU and
    then on the CPU must not see it destroyed and recreated.
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError(
                f"A process group of world size {dist.get_world_size()} is already running; "
                "`single_gpu_offload` trains on one device in one process."
            )
        return
    for key, value in _SINGLE_PROCESS_ENV.items():
        os.environ.setdefault(key, value)
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
