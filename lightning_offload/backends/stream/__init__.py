"""The streaming plan: models larger than the GPU, with ~2 bytes of host memory per parameter.

bf16 weights are split between the GPU (resident blocks) and pinned host memory (streamed blocks, copied in ahead
of use on a side stream for forward and again for recompute and backward); the 8-bit AdamW state of every
parameter lives in pinned host memory and passes through the GPU during backward, where each unit is updated by
the fused 8-bit AdamW kernel as soon as its gradients are final. No full-model gradient buffer, no fp32 master.
When host memory cannot hold it all, the state of some blocks lives in files on an NVMe drive instead (`nvme_path`).

    placement.py  which units stay resident (pure functions; the memory planner's terms)
    units.py      units of the model, and building them without a full host copy
    lanes.py      streams, events and pinned arenas, with the CPU standing in for the device in tests
    scheduler.py  prefetch order, slot rings, events, hooks, the update inside backward
    disk.py       the disk tier: state files, pinned staging buffers, reads ahead and writes back (DeepSpeed's aio)
    optimizer.py  the `torch.optim.Optimizer` Lightning steps, and the per-unit 8-bit buckets
    checkpoint.py save / resume one unit at a time, consolidation, disk pre-flight
    backend.py    the `Backend` the strategy drives
    from_pretrained_refused.py  transformers' `from_pretrained` refused while the model is built on the meta device
    spec.py       the planner's terms and candidate plans, and how its checkpoint consolidates
"""

from lightning_offload.backends.stream.backend import StreamBackend, StreamConfig

__all__ = ["StreamBackend", "StreamConfig"]
