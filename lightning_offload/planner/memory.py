"""The memory model: bytes on the GPU and in host memory for a model, a batch shape and a plan, term by term.

Pure functions over dataclasses; the model-dependent inputs come from `measure.ModelStats`. The terms every plan
has (the process, activations, the loss) are here; each backend's own come from its spec (`backends/spec.py`), with
its engine's constants named there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lightning_offload.backends import registry
from lightning_offload.planner.budget import CUDA_CONTEXT_BYTES, GIB, gpu_memory_available, host_memory_available
from lightning_offload.planner.measure import ModelStats
from lightning_offload.planner.terms import (
    EIGHT_BIT_OPTIMIZERS,
    NVME_STATES,
    OPTIMIZER_STATE_BYTES,
    MemoryInputs,
    Plan,
    checkpointed_blocks,
)

__all__ = ["EIGHT_BIT_OPTIMIZERS", "GIB", "NVME_STATES", "OPTIMIZER_STATE_BYTES", "Machine", "MemoryEstimate", "Plan",
           "checkpoint_bytes", "checkpointed_blocks", "estimate_memory", "shortfalls"]

# Python, torch, the CUDA runtime and Lightning in host memory before any model
# (bench/RESULTS.md, "Calibration constants").
PROCESS_BASELINE_BYTES = int(2.0 * GIB)
# A loss over the full logits (transformers' own) saves their fp32 log-softmax for backward, counted with the
# bytes outside the blocks; its backward holds two fp32 gradients of that size beside it
# (bench/RESULTS.md, "Calibration constants").
LOGIT_BACKWARD_BYTES = 8
# NCCL's communication buffers per GPU when several processes train together.
NCCL_BYTES = int(0.75 * GIB)
# GPU terms alive only while the blocks' backward runs (the gradients' in the weights' dtype).
BACKWARD_ONLY_TERMS = ("activations (one block recomputed)", "gradients (in flight)")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per tier, term by term (`gpu`, `host`, `disk`), for one plan; `host_pinned` says which host terms are
    pinned."""

    plan: Plan
    gpu: dict[str, int]
    host: dict[str, int]
    host_pinned: frozenset[str] = field(default_factory=frozenset)
    disk: dict[str, int] = field(default_factory=dict)

    @property
    def disk_bytes(self) -> int:
        return sum(self.disk.values())

    @property
    def gpu_bytes(self) -> int:
        return sum(self.gpu.values())

    @property
    def host_bytes(self) -> int:
        return sum(self.host.values())

    @property
    def pinned_bytes(self) -> int:
        return sum(v for k, v in self.host.items() if k in self.host_pinned)


def _activation_terms(stats: ModelStats, plan: Plan) -> dict[str, int]:
    per_block, layers = stats.activation_bytes_per_block, stats.blocks
    outside = {"activations outside the blocks": stats.outside_block_activation_bytes}
    if plan.checkpointing == "none":
        return {"activations": layers * per_block, **outside}
    if plan.checkpointing == "offload":
        # Saved tensors live in host memory; two blocks' worth are in flight on the GPU.
        return {"activations (in flight)": 2 * per_block, **outside}
    checkpointed = checkpointed_blocks(stats, plan)
    terms = {
        "activations (checkpointed blocks' inputs)": checkpointed * stats.block_input_bytes,
        "activations (kept blocks)": (layers - checkpointed) * per_block,
        "activations (one block recomputed)": per_block,
        **outside,
    }
    if plan.checkpointing == "first_n" and checkpointed < layers:
        # The last blocks are kept: backward frees their activations before it recomputes the first block.
        del terms["activations (one block recomputed)"]
    return terms


def estimate_memory(stats: ModelStats, plan: Plan, *, accumulate: int = 1, holds_gradients: bool = False,
                    clipping: str | None = None, world_size: int = 1,
                    ranks_per_host: int | None = None) -> MemoryEstimate:
    """Bytes `plan` needs for a model described by `stats` (bf16 compute), `accumulate` micro-batches per step.

    With `world_size` processes (`ranks_per_host` of them on each machine, default all), GPU terms are per GPU and
    host terms per machine: every rank on a host holds its own shard and its own process, which is how several
    ranks exhaust one host's RAM. `holds_gradients`: the run clips by global norm, so the plans that update
    inside backward keep every gradient until backward ends, as when accumulating. `clipping`: how the run clips
    ("norm", "value"; None: it does not); clipping by value keeps them too where the backend's spec says so.
    """
    spec = registry.find(plan.backend)
    if spec is None:
        raise ValueError(f"Unknown backend {plan.backend!r} in the plan. Choose one of "
                         f"{registry.available_backends()}.")
    if world_size > 1 and spec.multi_process is None:
        raise ValueError(f"The {plan.backend!r} plan drives one GPU; across processes choose one of "
                         f"{registry.multi_process_backends()}.")
    clipped_after_backward = clipping == "value" and spec.holds_gradients_to_clip_by_value
    whole_gradients = accumulate > 1 or holds_gradients or clipped_after_backward
    single = _estimate_one_rank(stats, plan, whole_gradients, accumulate > 1)
    if world_size == 1:
        return single
    local = ranks_per_host or world_size
    gpu, host = dict(single.gpu), {}
    for term, size in single.host.items():
        # Engine state is sharded over all ranks; each process and its saved activations are whole per rank.
        sharded = term not in ("process baseline", "saved activations") and spec.multi_process.shards_state
        host[term] = int(size * local / world_size) if sharded else size * local
    gpu["NCCL buffers"] = NCCL_BYTES
    gpu.update(spec.multi_process.gpu_terms(stats))
    return MemoryEstimate(plan, gpu, host, single.host_pinned, single.disk)


def _estimate_one_rank(stats: ModelStats, plan: Plan, whole_gradients: bool, accumulating: bool) -> MemoryEstimate:
    gpu: dict[str, int] = {"CUDA context": CUDA_CONTEXT_BYTES, **_activation_terms(stats, plan)}
    host: dict[str, int] = {"process baseline": PROCESS_BASELINE_BYTES}
    pinned = {"saved activations"}
    if plan.checkpointing == "offload":
        host["saved activations"] = stats.blocks * stats.activation_bytes_per_block
    spec, inputs = registry.spec(plan.backend), MemoryInputs(stats, plan, whole_gradients, accumulating)
    terms = spec.memory_terms(inputs)
    gpu.update(terms.gpu)
    host.update(terms.host)
    pinned |= terms.pinned
    disk = terms.disk
    # The loss's transients (a chunked loss's slice of logits in forward, the full logits' gradients at the start
    # of backward) exist while neither a recomputed block nor the blocks' gradients in flight do: only what they
    # need beyond those adds to the peak.
    loss_transient = stats.loss_workspace_bytes + LOGIT_BACKWARD_BYTES * stats.logits
    backward_only = sum(size for term, size in gpu.items() if term.endswith(BACKWARD_ONLY_TERMS))
    if loss_transient > backward_only:
        gpu["loss transients (beyond the blocks' backward)"] = loss_transient - backward_only
    # Building the model may hold more than a step does (fp32 weights cast once built): the peak is the larger.
    built = spec.built_on_gpu(inputs) if stats.built_at_setup and spec.built_on_gpu is not None else 0
    if built + CUDA_CONTEXT_BYTES > sum(gpu.values()):
        gpu["the model as built (beyond a step's terms)"] = built + CUDA_CONTEXT_BYTES - sum(gpu.values())
    return MemoryEstimate(plan, gpu, host, frozenset(pinned & set(host)), disk)


@dataclass(frozen=True, kw_only=True)
class Machine:
    """Memory a run may use. Defaults describe the project's reference machine (80 GB card, 125 GiB RAM).

    `unified`: the device is the CPU, so the "GPU" terms and the host terms draw on one pool of host memory.
    `gpu_limit` / `host_limit`: what holds a tier below what the machine has free (a budget, the job's cgroup
    limit), named in the planner's table and refusals; None: nothing.
    """

    gpu_memory_gib: float = 79.2
    host_memory_gib: float = 125.0
    unified: bool = False
    gpu_limit: str | None = None
    host_limit: str | None = None

    @classmethod
    def detect(cls, device: torch.device | None = None, *, max_gpu_memory_gib: float | None = None,
               max_host_memory_gib: float | None = None) -> Machine:
        """What this process may use right now on `device` (default: CUDA if present) and in host memory: what is
        free, within the job's cgroup memory limit, the allocator's per-process fraction and the budgets given
        (which only ever lower it)."""
        host = host_memory_available(max_host_memory_gib=max_host_memory_gib)
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type != "cuda":
            return cls(gpu_memory_gib=host.bytes / GIB, host_memory_gib=host.bytes / GIB, unified=True,
                       host_limit=host.limit)
        gpu = gpu_memory_available(device, max_gpu_memory_gib=max_gpu_memory_gib)
        return cls(gpu_memory_gib=gpu.bytes / GIB, host_memory_gib=host.bytes / GIB, gpu_limit=gpu.limit,
                   host_limit=host.limit)

    @property
    def limits(self) -> dict[str, str]:
        """What holds each tier below the machine's free memory, by the tier's name in shortfalls."""
        tiers = {"host RAM": self.host_limit} if self.unified else {"GPU": self.gpu_limit, "host RAM": self.host_limit}
        return {tier: limit for tier, limit in tiers.items() if limit}

    def __post_init__(self) -> None:
        for name in ("gpu_memory_gib", "host_memory_gib"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"`machine.{name}` must be a number of GiB (at least 0), got {value!r} (e.g. 80).")

    def describe(self) -> str:
        def tier(gib: float, name: str, limit: str | None) -> str:
            return f"{gib:.0f} GiB {name}" + (f" (held there by {limit})" if limit else "")

        if self.unified:
            return f"{tier(self.host_memory_gib, 'of host RAM', self.host_limit)} (training on the CPU)"
        return (f"{tier(self.gpu_memory_gib, 'GPU', self.gpu_limit)}, "
                f"{tier(self.host_memory_gib, 'host RAM', self.host_limit)}")


# Host memory kept free beside allocations whose size is exact (the margin covers estimates, not these).
EXACT_HOST_HEADROOM_GIB = 4.0


def shortfalls(estimate: MemoryEstimate, machine: Machine, margin: float = 0.9,
               exact_host_bytes: int = 0, disk_free_bytes: int | None = None) -> dict[str, float]:
    """GiB missing per tier (empty when the plan fits), keeping `1 - margin` of each tier free; the disk's tier
    (`disk_free_bytes` free, None: no disk given) for the plans that keep state there.

    `exact_host_bytes` of the host estimate are allocations of exactly that size (pinned arenas): the margin is
    kept on the rest of the estimate, and `EXACT_HOST_HEADROOM_GIB` beside them."""
    if machine.unified:
        missing = {"host RAM": (estimate.gpu_bytes + estimate.host_bytes) / GIB - margin * machine.host_memory_gib}
    else:
        host = estimate.host_bytes / GIB - margin * machine.host_memory_gib
        if exact_host_bytes:
            estimated = (estimate.host_bytes - exact_host_bytes) / GIB
            host = exact_host_bytes / GIB + estimated / margin + EXACT_HOST_HEADROOM_GIB - machine.host_memory_gib
        missing = {"GPU": estimate.gpu_bytes / GIB - margin * machine.gpu_memory_gib, "host RAM": host}
    if estimate.disk:
        free = disk_free_bytes or 0
        missing["disk"] = (estimate.disk_bytes - margin * free) / GIB
    return {tier: gib for tier, gib in missing.items() if gib > 0}


def checkpoint_bytes(stats: ModelStats, plan: Plan) -> int:
    """Bytes one checkpoint of `plan` takes on disk: weights in the precision the engine keeps as the truth, plus
    the optimizer state."""
    weights = registry.spec(plan.backend).checkpoint_weight_bytes
    return int(stats.parameters * (weights + OPTIMIZER_STATE_BYTES[plan.optimizer]))
