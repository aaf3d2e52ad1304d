"""The process group the engines run in: the launcher's when Lightning started several processes, else one of our own.

DeepSpeed and FSDP2 insist on `torch.distributed` even on one device. For one process the store is an in-memory
`HashStore`, so no port is opened: a notebook can call `fit` again, and several runs can share a machine, without
port clashes or a leftover rendezvous. For several processes the strategy joins the group that Lightning's cluster
environment describes (its launcher, `torchrun` or SLURM), exactly as Lightning's own DDP strategy does.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

# Variables DeepSpeed reads directly (zero.Init uses LOCAL_RANK) instead of asking torch.distributed.
_SINGLE_PROCESS_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1"}


def process_group_backend() -> str:
    """One group for CPU and CUDA tensors: engines move some collectives to the host (offloaded state, Lightning's
    object broadcasts) and keep others on the GPU."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def ensure_process_group(device: torch.device) -> None:
    """Makes sure a process group exists: the one the strategy joined, else a world-size-1 group.

    The one-process group lives as long as the process: engines keep references to it, so a notebook that trains on
    the GPU and then on the CPU must not see it destroyed and recreated.
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return
    for key, value in _SINGLE_PROCESS_ENV.items():
        os.environ.setdefault(key, value)
    dist.init_process_group(process_group_backend(), store=dist.HashStore(), rank=0, world_size=1)


def refuse_running_group(expected_world_size: int, strategy_name: str) -> None:
    """Raises when this process already belongs to a group of another size (one that a run before this one left)."""
    if dist.is_initialized() and dist.get_world_size() != expected_world_size:
        raise RuntimeError(
            f"A process group of world size {dist.get_world_size()} is already running in this process, but "
            f"`strategy={strategy_name!r}` needs {expected_world_size} process(es). Start the run in a fresh process "
            "(a new script or notebook kernel)."
        )


def join_process_group(cluster_environment: Any, device: torch.device, timeout: Any) -> None:
    """Joins the group of every process Lightning launched, and exports what DeepSpeed reads from the environment."""
    from lightning.fabric.utilities.distributed import _init_dist_connection

    os.environ.update(
        MASTER_ADDR=cluster_environment.main_address,
        MASTER_PORT=str(cluster_environment.main_port),
        RANK=str(cluster_environment.global_rank()),
        WORLD_SIZE=str(cluster_environment.world_size()),
        LOCAL_RANK=str(cluster_environment.local_rank()),
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _init_dist_connection(cluster_environment, process_group_backend(), timeout=timeout)


class _ProcessGroupRanks:
    """`saving.Ranks` over the default process group (object collectives run on its CPU backend)."""

    @property
    def is_global_zero(self) -> bool:
        return dist.get_rank() == 0

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        objects = [obj]
        dist.broadcast_object_list(objects, src)
        return objects[0]

    def barrier(self, name: str | None = None) -> None:
        dist.barrier()


def checkpoint_ranks() -> _ProcessGroupRanks | None:
    """The processes that write one checkpoint together; None for one process."""
    return _ProcessGroupRanks() if dist.is_initialized() and dist.get_world_size() > 1 else None
