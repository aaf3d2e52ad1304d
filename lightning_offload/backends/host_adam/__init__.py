"""Exact fp32 AdamW in host memory, stepped during backward while bf16 weights stay on the GPU.

    engine.py      buckets of gradients out, the fused CPU AdamW on a worker thread, weights back on a side stream
    backend.py     the `Backend` the strategy drives, and the `torch.optim.Optimizer` Lightning steps
    checkpoint.py  the checkpoint file: master weights and state of every parameter, read memory-mapped
    spec.py        the planner's terms and candidate plans, and how its checkpoint consolidates
"""

from lightning_offload.backends.host_adam.backend import HostAdamBackend, HostAdamConfig, HostAdamW
from lightning_offload.backends.host_adam.checkpoint import (
    CHECKPOINT_FILE,
    fp32_state_dict,
    read_checkpoint,
    saved_parameters,
)

__all__ = ["CHECKPOINT_FILE", "HostAdamBackend", "HostAdamConfig", "HostAdamW", "fp32_state_dict",
           "read_checkpoint", "saved_parameters"]
