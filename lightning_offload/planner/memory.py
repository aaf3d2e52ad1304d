"""The memory model: bytes on the GPU and in host memory for a model, a batch shape and a plan, term by term.

Pure functions over dataclasses; the model-dependent inputs come from `measure.ModelStats`. Engine constants are
named where they are used and say where their value comes from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lightning_offload.backends.stream.placement import disk_tier_bytes as stream_disk_tier_bytes
from lightning_offload.planner.budget import CUDA_CONTEXT_BYTES, GIB, gpu_memory_available, host_memory_available
from lightning_offload.planner.measure import ModelStats

# Bytes of optimizer state per parameter. bitsandbytes keeps one fp32 absmax per 256-element block per moment;
# the fused kernel's record is 528 bytes per 256 elements (bench/NOTES_kernel.md).
OPTIMIZER_STATE_BYTES = {
    "adamw": 8.0,
    "cpu_adam": 8.0,
    "adamw8bit": 2 + 2 * 4 / 256,
    "paged_adamw8bit": 2 + 2 * 4 / 256,
    "adamw8bit_fused": 528 / 256,
    "lion8bit": 1 + 4 / 256,
}
EIGHT_BIT_OPTIMIZERS = frozenset(name for name, size in OPTIMIZER_STATE_BYTES.items() if size < 4)
# Python, torch, the CUDA runtime and Lightning in host memory before any model: the peak RSS of runs that keep
# nothing in host memory (bench/RESULTS.md: 1.8-2.0 GiB for gpu_8bit at 3.6B and 8B and `device` at 1.5B through
# `single_gpu_offload`; ANCHORS.md: 1.7-2 GiB for the plain loop and torchtune's method).
PROCESS_BASELINE_BYTES = int(2.0 * GIB)
# A loss over the full logits (transformers' own) saves their fp32 log-softmax for backward, counted with the
# measured bytes outside the blocks; its backward holds two fp32 gradients of that size beside it (the NLL's and
# log-softmax's input's): 8 bytes per logit above what forward left, measured on the CPU with torch's profiler.
LOGIT_BACKWARD_BYTES = 8
# DeepSpeed ZeRO-3 offload holds more host memory than its documented partitions (bf16 weights 2, fp32 master 4,
# fp32 gradients 4, Adam state 8 bytes/param): bf16 gradient partitions, swap buffers and the pinned allocator's
# rounding. Measured on the H100 machine (bench/RESULTS.md, `deepspeed` rows): 35.85 GiB RSS at 1.5B and 84.0 GiB at
# 3.6B, i.e. 6.3 and 6.4 bytes/param above the 18 and the process's 2 GiB.
DEEPSPEED_ENGINE_HOST_BYTES_PER_PARAM = 6.4
# ZeRO-Infinity's buffers as the `deepspeed` backend configures them with state on NVMe (`offload_device="nvme"`):
# five pinned bf16 parameter swap buffers of `DEEPSPEED_NVME_BUFFER_NUMEL` elements (a parameter larger than one
# stays in host memory: 250M covers every matrix of a 70B Llama block, 8192 x 28672), the bf16 partitions of the
# first billion parameters kept in host memory (DeepSpeed's `max_in_cpu`), and four pinned fp32 optimizer swap
# buffers of one sub-group (`sub_group_size`) each. The fp32 gradient partitions stay in host memory as with CPU
# offload, and are written to disk once per step for the sub-group updates to read back.
DEEPSPEED_NVME_BUFFER_COUNT = 5
DEEPSPEED_NVME_BUFFER_NUMEL = 250_000_000
DEEPSPEED_NVME_PARAMS_IN_HOST = 1_000_000_000
DEEPSPEED_NVME_OPTIMIZER_BUFFER_COUNT = 4
DEEPSPEED_NVME_SUB_GROUP_NUMEL = 100_000_000
# Which state a `deepspeed` plan on NVMe keeps there.
NVME_STATES = ("all", "parameters", "optimizer")
_ON_DISK = {"all": "all state", "parameters": "parameters", "optimizer": "optimizer state"}
# host_adam's buffers at its default sizes (backends/host_adam.py): three pinned fp32 gradient slots of a 16M-parameter
# bucket, and eight fp32 staging pieces of 2M parameters on the GPU, where the updated weights land to be cast there
# (`cast_on_device`, the default; casting on the host stages 32 MiB of bf16 in pinned host memory instead).
HOST_ADAM_GRADIENT_SLOT_BYTES = 3 * 16_000_000 * 4
HOST_ADAM_DEVICE_STAGING_BYTES = 8 * 2_000_000 * 4
# FSDP2 pins its host shards through torch's caching host allocator, which rounds every block up to a power of two:
# 40% on top of the 8 pinned bytes/param at 3.6B (37.8 GiB pinned, 66.5 GiB RSS measured, bench/RESULTS.md).
FSDP_PINNED_ROUNDING = 0.40
# bitsandbytes' 8-bit optimizers on host tensors (FSDP's CPU-offloaded shards) dequantize the parameter being
# stepped to fp32 state and temporaries: 20 bytes per element of it on top of the state, one parameter at a time
# (measured on the CPU, bitsandbytes 0.50, 64M- and 256M-element parameters; the GPU kernels need none).
HOST_EIGHT_BIT_UPDATE_BYTES_PER_ELEMENT = 20
# The streaming plan's weight and state rings hold this many units each (backends/stream, `weight_slots`).
STREAM_SLOTS = 3
# NCCL's communication buffers per GPU when several processes train together.
NCCL_BYTES = int(0.75 * GIB)
# Plans that span several processes (the others drive one GPU); `device` becomes DDP.
MULTI_PROCESS_BACKENDS = ("deepspeed", "device", "fsdp")
BACKENDS = ("device", "deepspeed", "fsdp", "gpu_8bit", "host_adam", "stream")
# GPU terms alive only while the blocks' backward runs.
BACKWARD_ONLY_TERMS = ("activations (one block recomputed)", "bf16 gradients (in flight)")


@dataclass(frozen=True, kw_only=True)
class Plan:
    backend: str
    """Where the state lives: `device` (nothing offloaded), `gpu_8bit` (bf16 weights + 8-bit state on the GPU,
    updated inside backward), `host_adam` (bf16 weights on the GPU, fp32 master + AdamW state in host memory),
    `stream` (blocks' weights and 8-bit state in host memory, streamed through the GPU), `deepspeed` (ZeRO-3,
    parameters and optimizer state in host memory) or `fsdp` (FSDP2 CPU offload)."""
    optimizer: str = "adamw"
    checkpointing: str = "full"
    """`none`, `full`, `every_k` (every `every_k`-th block) or `offload` (saved tensors in pinned host memory)."""
    every_k: int = 2
    pin_memory: bool = True
    resident_blocks: int | None = 0
    """`stream`: blocks whose weights stay on the GPU; the others stream from host memory. `host_adam`: blocks at
    the front of the model whose fp32 master weights and AdamW state stay on the GPU, with the input embedding,
    updated there inside backward; the others' state is in host memory. None (a `host_adam` candidate before
    `choose`): the most that fit."""
    accumulate_on_gpu: bool = False
    """`fsdp` with gradient accumulation: the micro-batches' gradients add up on the GPU in fp32 and go to host
    memory once per step, instead of once per micro-batch."""
    offload_device: str = "cpu"
    """`deepspeed`: `cpu` (state in host memory) or `nvme` (ZeRO-Infinity: `nvme_state` in files on a disk)."""
    nvme_state: str = "all"
    """`deepspeed` on `nvme`: the state kept on disk: `all`, `parameters` (bf16 weights) or `optimizer` (fp32
    master weights, gradients and optimizer state)."""
    disk_blocks: int | None = 0
    """`stream`: blocks whose 8-bit optimizer state lives in files under `nvme_path`; None (a candidate before
    `choose`): the fewest that fit."""

    def __str__(self) -> str:
        policy = f"every_{self.every_k}" if self.checkpointing == "every_k" else self.checkpointing
        resident = {"stream": f", {self.resident_blocks} resident blocks",
                    "host_adam": f", {self.resident_blocks} blocks' state on the GPU"}.get(self.backend, "")
        accumulated = ", gradients accumulated on the GPU" if self.accumulate_on_gpu else ""
        on_disk = f", {_ON_DISK[self.nvme_state]} on NVMe" if self.on_disk else ""
        on_disk += f", {self.disk_blocks} blocks' state on NVMe" if self.disk_blocks else ""
        return f"{self.backend} + {self.optimizer} + checkpointing={policy}{resident}{accumulated}{on_disk}"

    @property
    def on_disk(self) -> bool:
        return self.backend == "deepspeed" and self.offload_device == "nvme"

    @property
    def parameters_on_disk(self) -> bool:
        return self.on_disk and self.nvme_state in ("all", "parameters")

    @property
    def optimizer_on_disk(self) -> bool:
        return self.on_disk and self.nvme_state in ("all", "optimizer")

    @property
    def exact_optimizer(self) -> bool:
        """True when the optimizer's arithmetic is the user's (fp32 state), False for 8-bit state."""
        return self.optimizer not in EIGHT_BIT_OPTIMIZERS


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


def gpu_state_parameters(stats: ModelStats, plan: Plan) -> int:
    """`host_adam`: trainable parameters whose optimizer state stays on the GPU: those of the first
    `resident_blocks` blocks and of the input embedding before them (the backend's `gpu_state_blocks`)."""
    blocks = min(plan.resident_blocks or 0, stats.blocks)
    return blocks * stats.trainable_block_parameters + (stats.trainable_embedding_parameters if blocks else 0)


def checkpointed_blocks(stats: ModelStats, plan: Plan) -> int:
    if plan.checkpointing in ("none", "offload"):
        return 0
    return stats.blocks if plan.checkpointing == "full" else math.ceil(stats.blocks / plan.every_k)


def _activation_terms(stats: ModelStats, plan: Plan) -> dict[str, int]:
    per_block, layers = stats.activation_bytes_per_block, stats.blocks
    outside = {"activations outside the blocks": stats.outside_block_activation_bytes}
    if plan.checkpointing == "none":
        return {"activations": layers * per_block, **outside}
    if plan.checkpointing == "offload":
        # Saved tensors live in host memory; two blocks' worth are in flight on the GPU.
        return {"activations (in flight)": 2 * per_block, **outside}
    checkpointed = checkpointed_blocks(stats, plan)
    return {
        "activations (checkpointed blocks' inputs)": checkpointed * stats.block_input_bytes,
        "activations (kept blocks)": (layers - checkpointed) * per_block,
        "activations (one block recomputed)": per_block,
        **outside,
    }


def _gradients_waiting_for_the_host(stats: ModelStats, plan: Plan) -> int:
    """`host_adam`: bf16 gradients of the blocks whose state is in host memory that may wait on the GPU for a pinned
    slot while the host steps earlier ones, beyond the activations their own backward frees.

    Nothing but the host's pace bounds that queue, so all of them count. A block kept whole frees more than it
    produces; a checkpointed block frees only its input: at 8B with 15 of 32 blocks stepped by the host and every
    block checkpointed, the measured peak was 4 GiB above the estimate without this term (bench/RESULTS.md).
    """
    host_blocks = stats.blocks - min(plan.resident_blocks or 0, stats.blocks)
    checkpointed = checkpointed_blocks(stats, plan) / stats.blocks if stats.blocks else 0.0
    freed = (0 if plan.checkpointing == "offload" else
             checkpointed * stats.block_input_bytes + (1 - checkpointed) * stats.activation_bytes_per_block)
    return int(host_blocks * max(0.0, 2 * stats.trainable_block_parameters - freed))


def estimate_memory(stats: ModelStats, plan: Plan, *, accumulate: int = 1, holds_gradients: bool = False,
                    world_size: int = 1, ranks_per_host: int | None = None,
                    reduce_bucket_elements: int = 200_000_000,
                    prefetch_bucket_elements: int = 50_000_000) -> MemoryEstimate:
    """Bytes `plan` needs for a model described by `stats` (bf16 compute), `accumulate` micro-batches per step.

    With `world_size` processes (`ranks_per_host` of them on each machine, default all), GPU terms are per GPU and
    host terms per machine: every rank on a host holds its own shard and its own process, which is how several
    ranks exhaust one host's RAM. `holds_gradients`: the run clips by global norm, so the plans that update
    inside backward keep every gradient until backward ends, as when accumulating.
    """
    if plan.backend not in BACKENDS:
        raise ValueError(f"Unknown backend {plan.backend!r} in the plan. Choose one of {list(BACKENDS)}.")
    if world_size > 1 and plan.backend not in MULTI_PROCESS_BACKENDS:
        raise ValueError(f"The {plan.backend!r} plan drives one GPU; across processes choose one of "
                         f"{list(MULTI_PROCESS_BACKENDS)}.")
    whole_gradients = accumulate > 1 or holds_gradients
    single = _estimate_one_rank(stats, plan, whole_gradients, accumulate > 1, reduce_bucket_elements,
                                prefetch_bucket_elements)
    if world_size == 1:
        return single
    local = ranks_per_host or world_size
    gpu, host = dict(single.gpu), {}
    for term, size in single.host.items():
        # Engine state is sharded over all ranks; each process and its saved activations are whole per rank.
        sharded = term not in ("process baseline", "saved activations") and plan.backend != "device"
        host[term] = int(size * local / world_size) if sharded else size * local
    gpu["NCCL buffers"] = NCCL_BYTES
    if plan.backend == "device":
        gpu["DDP gradient buckets"] = 4 * stats.trainable_parameters
    return MemoryEstimate(plan, gpu, host, single.host_pinned, single.disk)


def _estimate_one_rank(stats: ModelStats, plan: Plan, whole_gradients: bool, accumulating: bool,
                       reduce_bucket_elements: int, prefetch_bucket_elements: int) -> MemoryEstimate:
    params, block = stats.parameters, stats.block_parameters
    # Frozen parameters take no gradient and no optimizer state: torch's optimizers (device, DeepSpeed, FSDP) skip
    # what gets no gradient, the stream and host_adam engines keep state for trainable parameters only (host_adam
    # cannot hook a frozen one). gpu_8bit's 8-bit AdamW keeps state for every parameter it holds: charged for all.
    trained, trained_block = stats.trainable_parameters, stats.trainable_block_parameters
    state_bytes = OPTIMIZER_STATE_BYTES[plan.optimizer]
    gpu: dict[str, int] = {"CUDA context": CUDA_CONTEXT_BYTES, **_activation_terms(stats, plan)}
    host: dict[str, int] = {"process baseline": PROCESS_BASELINE_BYTES}
    pinned = {"saved activations"}
    disk: dict[str, int] = {}
    if plan.checkpointing == "offload":
        host["saved activations"] = stats.blocks * stats.activation_bytes_per_block

    def gradients_updated_in_backward(unit: int) -> dict[str, int]:
        # One unit's gradients in flight while the previous unit's update runs; accumulating (or clipping by norm)
        # keeps every gradient until the step besides them: R2 measured 2 B/param above R1 (bench/RESULTS.md:
        # gpu_8bit and host_adam at 1.5B, gpu_8bit and stream at 3.6B).
        terms = {"bf16 gradients (in flight)": 2 * 2 * unit}
        if whole_gradients:
            terms["bf16 gradients (kept until the step)"] = 2 * trained
        return terms

    if plan.backend == "device":
        gpu.update({"fp32 weights": 4 * params, "fp32 gradients": 4 * trained,
                    "optimizer state": int(state_bytes * trained)})
        if accumulating:
            # A later micro-batch's gradient of a parameter exists beside the sum it is added to: counted as a whole
            # block's or the embedding's, whichever is larger (3.6B measured 1.85 GiB above one micro-batch; its
            # embedding's fp32 gradient is 1.47).
            gpu["fp32 gradients (in flight, accumulating)"] = 4 * max(trained_block, stats.embedding_parameters)
    elif plan.backend == "gpu_8bit":
        gpu.update({"bf16 weights": 2 * params, "optimizer state": int(state_bytes * params),
                    **gradients_updated_in_backward(trained_block)})
    elif plan.backend == "host_adam":
        # fp32 gradients land in a few pinned slots, and the updated weights leave as fp32 straight from the master
        # weights, which are page-locked for it; the AdamW state is ordinary memory, since no copy starts or ends in
        # it. The front blocks' master weights and state are on the GPU instead.
        on_gpu = gpu_state_parameters(stats, plan)
        gpu.update({"bf16 weights": 2 * params, **gradients_updated_in_backward(trained_block),
                    "weight staging (fp32, cast here)": HOST_ADAM_DEVICE_STAGING_BYTES})
        if on_gpu:
            gpu["fp32 master weights and optimizer state (front blocks)"] = int((4 + state_bytes) * on_gpu)
        waiting = _gradients_waiting_for_the_host(stats, plan) - 2 * 2 * trained_block
        if waiting > 0 and not whole_gradients:
            gpu["bf16 gradients waiting for the host"] = waiting
        host.update({"fp32 master weights": 4 * (trained - on_gpu),
                     "optimizer state": int(state_bytes * (trained - on_gpu)),
                     "gradient slots": HOST_ADAM_GRADIENT_SLOT_BYTES})
        pinned |= {"fp32 master weights", "gradient slots"}
    elif plan.backend == "stream":
        resident = min(plan.resident_blocks, stats.blocks)
        streamed = (stats.blocks - resident) * block
        # The largest unit streamed through the rings may be the embedding or the output layer, not a block.
        largest = max(block, stats.embedding_parameters)
        gpu.update({
            "bf16 weights (resident blocks, embeddings, head)": 2 * (resident * block + stats.other_parameters),
            "bf16 weight ring (three units)": 2 * STREAM_SLOTS * block,
            "optimizer state ring (three units)": int(STREAM_SLOTS * state_bytes * largest),
            **gradients_updated_in_backward(max(trained_block, stats.embedding_parameters)),
        })
        host.update({"bf16 weights (streamed blocks)": 2 * streamed,
                     "optimizer state": int(state_bytes * trained)})
        pinned |= {"bf16 weights (streamed blocks)", "optimizer state", "disk staging buffers"}
        moved, staging = stream_disk_tier_bytes(int(state_bytes * trained_block), plan.disk_blocks or 0)
        if moved:
            host["optimizer state"] -= moved
            host["disk staging buffers"] = staging
            disk["8-bit optimizer state (blocks on disk)"] = moved
    elif plan.backend == "deepspeed":
        gathered = 2 * max(block, stats.other_parameters)
        gpu.update({
            "gathered bf16 weights (two blocks)": 2 * gathered,
            "prefetch bucket": 2 * prefetch_bucket_elements,
            "gradient reduce buckets (bf16, double-buffered)": 2 * 2 * reduce_bucket_elements,
        })
        # ZeRO-3 keeps fp32 partitions of the trainable parameters only; every parameter has a bf16 partition.
        engine_terms = {"bf16 weight partitions": 2 * params, "fp32 master weights": 4 * trained,
                        "fp32 gradients": 4 * trained, "optimizer state": int(state_bytes * trained),
                        "engine buffers (bf16 gradient partitions, swap)":
                            int(DEEPSPEED_ENGINE_HOST_BYTES_PER_PARAM * trained)}
        if plan.on_disk:
            engine_terms, disk = _deepspeed_nvme_terms(stats, plan, engine_terms)
        host.update(engine_terms)
        if plan.pin_memory:
            pinned |= set(engine_terms)
    else:  # fsdp
        gpu.update({
            "gathered bf16 weights (two blocks)": 2 * 2 * block,
            "root unit bf16 weights (embeddings, head)": 2 * stats.other_parameters,
            "fp32 gradients of one block before offload": 4 * trained_block,
        })
        if plan.accumulate_on_gpu and whole_gradients:
            gpu["fp32 gradients accumulated over micro-batches"] = 4 * trained
        host.update({"fp32 weight shards": 4 * params, "fp32 gradient shards": 4 * trained,
                     "optimizer state": int(state_bytes * trained)})
        if plan.optimizer in EIGHT_BIT_OPTIMIZERS:
            largest = max(block, stats.embedding_parameters)  # no parameter is larger than its block
            host["8-bit update temporaries (largest parameter)"] = HOST_EIGHT_BIT_UPDATE_BYTES_PER_ELEMENT * largest
        if plan.pin_memory:
            host["pinned block rounding"] = int(FSDP_PINNED_ROUNDING * 8 * params)
            pinned |= {"fp32 weight shards", "fp32 gradient shards", "pinned block rounding"}
    # The loss's transients (a chunked loss's slice of logits in forward, the full logits' gradients at the start
    # of backward) exist while neither a recomputed block nor the blocks' gradients in flight do: only what they
    # need beyond those adds to the peak.
    loss_transient = stats.loss_workspace_bytes + LOGIT_BACKWARD_BYTES * stats.logits
    backward_only = sum(gpu.get(term, 0) for term in BACKWARD_ONLY_TERMS)
    if loss_transient > backward_only:
        gpu["loss transients (beyond the blocks' backward)"] = loss_transient - backward_only
    return MemoryEstimate(plan, gpu, host, frozenset(pinned & set(host)), disk)


def _deepspeed_nvme_terms(stats: ModelStats, plan: Plan,
                          in_host: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """ZeRO-Infinity: the host terms that move to disk (the `DEEPSPEED_NVME_*` buffers take their place in host
    memory), and the disk's terms. The engine's own buffers are kept at their host-offload size until measured."""
    params, host, disk = stats.parameters, dict(in_host), {}
    if plan.parameters_on_disk:
        # Parameters outside the blocks (embeddings, output layer) may be larger than a swap buffer: counted in host
        # memory, like the partitions DeepSpeed keeps there.
        kept = min(params, DEEPSPEED_NVME_PARAMS_IN_HOST + stats.other_parameters)
        host["bf16 weight partitions"] = 2 * kept
        host["parameter swap buffers"] = 2 * DEEPSPEED_NVME_BUFFER_COUNT * DEEPSPEED_NVME_BUFFER_NUMEL
        disk["bf16 weight partitions"] = 2 * (params - kept)
    if plan.optimizer_on_disk:
        for term in ("fp32 master weights", "optimizer state"):
            disk[term] = host.pop(term)
        disk["fp32 gradients"] = host["fp32 gradients"]  # written once per step for the sub-group updates
        sub_group = min(params, DEEPSPEED_NVME_SUB_GROUP_NUMEL)
        host["optimizer swap buffers"] = 4 * DEEPSPEED_NVME_OPTIMIZER_BUFFER_COUNT * sub_group
    return host, disk


@dataclass(frozen=True, kw_only=True)
class Machine:
    """Memory a run may use. Defaults describe the project's H100 machine (80 GB card, 125 GiB RAM).

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


# Bytes per parameter a checkpoint of each plan writes: weights in the precision the engine keeps as the truth, plus
# the optimizer state (DeepSpeed also writes its bf16 partitions).
_CHECKPOINT_WEIGHT_BYTES = {"device": 4, "fsdp": 4, "deepspeed": 2 + 4, "host_adam": 4, "gpu_8bit": 2, "stream": 2}


def checkpoint_bytes(stats: ModelStats, plan: Plan) -> int:
    """Bytes one checkpoint of `plan` takes on disk."""
    return int(stats.parameters * (_CHECKPOINT_WEIGHT_BYTES[plan.backend] + OPTIMIZER_STATE_BYTES[plan.optimizer]))
