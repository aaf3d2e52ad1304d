"""Every way a user can train one model on one GPU, as the benchmark runs it: what each row is, no torch needed.

`runner` names the function in bench/runners.py that runs the method and `options` are its arguments, so the
rows that share a mechanism (the Lightning Trainer, DeepSpeed's engine) share its code and differ only here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from bench.limits import COSTS, CPU_DEEPSPEED_ADAM

OURS = "single_gpu_offload"


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    runner: str
    cost: str
    """Key of `bench.limits.COSTS`: what the step moves over PCIe and where the optimizer runs."""
    options: dict[str, Any] = field(default_factory=dict)
    accumulates: bool = True
    runs_on_cpu: bool = False
    note: str = ""
    """Shown next to every result of the method (e.g. that its updates are stale by design)."""

    def __post_init__(self) -> None:
        if self.cost not in COSTS:
            raise ValueError(f"Method {self.name!r}: unknown cost {self.cost!r}; choose one of {sorted(COSTS)}.")

    @property
    def builds_deepspeed_cpu_adam(self) -> bool:
        """DeepSpeed JIT-compiles its CPU Adam on first use (~60 s): the cell's time limit must allow for it."""
        return COSTS[self.cost].optimizer_rate == CPU_DEEPSPEED_ADAM


_LIGHTNING_DEFAULTS = "bf16-mixed, default foreach AdamW, reentrant checkpointing"

BASELINES = [
    Method("plain", "plain PyTorch loop: fp32 weights, bf16 autocast, fused AdamW, no offload",
           runner="plain", cost="gpu_adamw", runs_on_cpu=True),
    Method("torchtune", "torchtune single-device method: bf16, bnb PagedAdamW8bit stepped in backward",
           runner="torchtune", cost="gpu_8bit_adamw", accumulates=False),
    Method("torchao_offload", "torchao CPUOffloadOptimizer (fused CPU AdamW, offload_gradients), bf16",
           runner="torchao_offload", cost="torchao_offload", accumulates=False),
    Method("deepspeed_zero2_offload", "DeepSpeed ZeRO-2 + CPU optimizer offload, driven directly",
           runner="deepspeed", cost="zero2_offload", options={"zenflow": False}),
    Method("deepspeed_zenflow", "DeepSpeed ZenFlow (ZeRO-2 offload, top-k 0.05, update interval 4)",
           runner="deepspeed", cost="zenflow", options={"zenflow": True}, note="stale updates"),
    Method("lightning_auto", f'Lightning "auto" ({_LIGHTNING_DEFAULTS})', runner="lightning", cost="gpu_adamw",
           options={"strategy": "auto", "checkpointing": "reentrant", "optimizer": "adamw"}, runs_on_cpu=True),
    Method("lightning_deepspeed_stage_2_offload", "Lightning `deepspeed_stage_2_offload` (DeepSpeed CPU Adam)",
           runner="lightning", cost="zero2_offload",
           options={"strategy": "deepspeed_stage_2_offload", "checkpointing": "reentrant",
                    "optimizer": "deepspeed_cpu_adam"}),
    Method("lightning_deepspeed_stage_3_offload", "Lightning `deepspeed_stage_3_offload` (DeepSpeed CPU Adam)",
           runner="lightning", cost="zero3_offload",
           options={"strategy": "deepspeed_stage_3_offload", "checkpointing": "reentrant",
                    "optimizer": "deepspeed_cpu_adam"}),
    Method("lightning_deepspeed_stage_3_offload_pinned",
           "Lightning DeepSpeed ZeRO-3, parameters and optimizer offloaded to CPU, pinned memory (DeepSpeed CPU Adam)",
           runner="lightning", cost="zero3_offload",
           options={"strategy": "deepspeed_stage_3_offload_pinned", "checkpointing": "reentrant",
                    "optimizer": "deepspeed_cpu_adam"}),
    Method("lightning_fsdp_cpu_offload", "Lightning `FSDPStrategy(cpu_offload=True)`, decoder-layer checkpointing",
           runner="lightning", cost="fsdp_cpu_offload",
           options={"strategy": "fsdp_cpu_offload", "checkpointing": "by_strategy", "optimizer": "adamw"}),
]


# Backends whose plan includes what the module would otherwise choose: how many blocks to checkpoint (the
# backend decides) and a loss that never materialises the full logits.
_PLAN_OPTIONS = {"gpu_8bit": {"checkpointing": "by_strategy", "loss": "chunked"},
                 "host_adam": {"checkpointing": "by_strategy", "loss": "chunked"},
                 # The module checkpoints every layer (the planner plans `full`); a 152K vocabulary's fp32 logits
                 # would take ~12 GiB of the GPU, i.e. a dozen resident blocks' worth of host memory.
                 "stream": {"loss": "chunked"}}
_PLAN_LABELS = {"gpu_8bit": ", blocks checkpointed as memory needs, chunked loss",
                "host_adam": ", checkpointing and the optimizer state's GPU share by the planner, chunked loss",
                "stream": ", resident blocks by the planner, chunked loss"}
# More rows of a backend beside its default one: (name suffix, backend options, label).
_VARIANTS = {
    "host_adam": [
        ("all_host", {"gpu_state_blocks": 0, "cast_on_device": False},
         "; every optimizer state in host memory, weights cast on the host"),
        ("all_host_cast_on_device", {"gpu_state_blocks": 0, "cast_on_device": True},
         "; every optimizer state in host memory, weights cast on the GPU"),
        ("cast_on_host", {"cast_on_device": False}, "; weights cast on the host"),
    ],
    # ZeRO-Infinity: the bf16 weights on NVMe under $BENCH_NVME_PATH (a folder the calling script makes); all state
    # (18 bytes/param) would not fit the benchmark machine's 64 GiB disk at 3.6B.
    "deepspeed": [("nvme_parameters", {"offload_device": "nvme", "nvme_state": "parameters",
                                       "nvme_path": os.environ.get("BENCH_NVME_PATH", "/tmp/nvme_swap")},
                   "; bf16 weights on NVMe (ZeRO-Infinity)")],
    "gpu_8bit": [("compiled", {"compile_blocks": True}, "; decoder layers compiled")],
    "stream": [("compiled", {"compile_blocks": True}, "; decoder layers compiled")],
}


def ours(backend: str, cost: str, suffix: str = "", backend_options: dict[str, Any] | None = None,
         label: str = "") -> Method:
    """A `single_gpu_offload` row; the backend converts the module's plain AdamW to its own optimizer."""
    options = {"strategy": OURS, "backend": backend, "checkpointing": "non_reentrant", "optimizer": "adamw",
               **_PLAN_OPTIONS.get(backend, {})}
    if backend_options:
        options["backend_options"] = backend_options
    return Method(f"{OURS}_{backend}" + (f"_{suffix}" if suffix else ""),
                  f'{OURS} (backend="{backend}"{_PLAN_LABELS.get(backend, "")}{label})',
                  runner="lightning", cost=cost, options=options, runs_on_cpu=True)


def all_methods(our_backends: dict[str, str]) -> dict[str, Method]:
    """The baselines and the rows of each backend of ours (`{backend: cost}`, from bench/matrix.yaml), by name."""
    methods = [*BASELINES]
    for backend, cost in our_backends.items():
        methods.append(ours(backend, cost))
        methods += [ours(backend, cost, *variant) for variant in _VARIANTS.get(backend, [])]
    return {method.name: method for method in methods}
