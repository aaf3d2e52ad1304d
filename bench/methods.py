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
# Each baseline at the settings its library's docs or recipe give for speed ("tuned"), beside the settings users
# commonly run it with ("defaults", the rows measured first). Every row checkpoints every decoder layer and runs on
# the same CUDA allocator settings (bench/runners.py `same_allocator`).
_TORCHTUNE = "torchtune full_finetune_single_device (reimplemented, bench/runners.py), bf16, bnb PagedAdamW8bit"
_DEEPSPEED_DEFAULTS = "defaults: pin_memory=False, reentrant checkpointing"
_DEEPSPEED_TUNED = "tuned: pin_memory=True, non-reentrant checkpointing"

BASELINES = [
    Method("plain", "plain PyTorch loop: fp32 weights, bf16 autocast, fused AdamW, no offload",
           runner="plain", cost="gpu_adamw", runs_on_cpu=True),
    Method("torchtune", f"{_TORCHTUNE} stepped in backward; defaults: eager, full fp32 logits",
           runner="torchtune", cost="gpu_8bit_adamw", accumulates=False),
    # torchtune recipes/configs/llama3_1/8B_full_single_device.yaml as shipped: `loss: LinearCrossEntropyLoss`,
    # `compile: False`, `optimizer_in_bwd: True`.
    Method("torchtune_linear", f"{_TORCHTUNE} stepped in backward; its 8B config as shipped: eager, "
                               "LinearCrossEntropyLoss (8 chunks)",
           runner="torchtune", cost="gpu_8bit_adamw", accumulates=False,
           options={"compiled": False, "loss": "linear", "optimizer_in_backward": True}),
    # The same config with `compile: True` ("True increases speed + decreases memory"; training/_compile.py).
    Method("torchtune_compiled", f"{_TORCHTUNE} stepped in backward; tuned: layers and loss compiled, "
                                 "LinearCrossEntropyLoss (8 chunks)",
           runner="torchtune", cost="gpu_8bit_adamw", accumulates=False,
           options={"compiled": True, "loss": "linear", "optimizer_in_backward": True}),
    # The same config's `gradient_accumulation_steps` needs `optimizer_in_bwd: False` (one optimizer, stepped
    # after the micro-batches).
    Method("torchtune_accumulating", f"{_TORCHTUNE} stepped after accumulation; tuned: layers and loss compiled, "
                                     "LinearCrossEntropyLoss (8 chunks)",
           runner="torchtune", cost="gpu_8bit_adamw",
           options={"compiled": True, "loss": "linear", "optimizer_in_backward": False}),
    Method("torchao_offload", "torchao CPUOffloadOptimizer (fused CPU AdamW, offload_gradients), bf16",
           runner="torchao_offload", cost="torchao_offload", accumulates=False),
    # torchao/optim/README.md "Optimizer CPU offload": `offload_gradients=True` "is not compatible with gradient
    # accumulation"; the default (False) keeps gradients on the GPU, which accumulates.
    Method("torchao_offload_accumulating",
           "torchao CPUOffloadOptimizer (fused CPU AdamW, gradients accumulated on the GPU), bf16",
           runner="torchao_offload", cost="torchao_offload", options={"offload_gradients": False}),
    Method("deepspeed_zero2_offload", "DeepSpeed ZeRO-2 + CPU optimizer offload, driven directly",
           runner="deepspeed", cost="zero2_offload", options={"zenflow": False}),
    Method("deepspeed_zenflow", "DeepSpeed ZenFlow (ZeRO-2 offload, top-k 0.05, update interval 4)",
           runner="deepspeed", cost="zenflow", options={"zenflow": True}, note="stale updates"),
    Method("lightning_auto", f'Lightning "auto" ({_LIGHTNING_DEFAULTS})', runner="lightning", cost="gpu_adamw",
           options={"strategy": "auto", "checkpointing": "reentrant", "optimizer": "adamw"}, runs_on_cpu=True),
    Method("lightning_deepspeed_stage_2_offload",
           f"Lightning `deepspeed_stage_2_offload` (DeepSpeed CPU Adam); {_DEEPSPEED_DEFAULTS}",
           runner="lightning", cost="zero2_offload",
           options={"strategy": "deepspeed_stage_2_offload", "checkpointing": "reentrant",
                    "optimizer": "deepspeed_cpu_adam"}),
    # DeepSpeed's config docs (deepspeed.ai/docs/config-json, "Optimizer offloading"): `pin_memory` "could boost
    # throughput"; torch.utils.checkpoint's docs recommend `use_reentrant=False`.
    Method("lightning_deepspeed_stage_2_offload_tuned",
           f"Lightning DeepSpeed ZeRO-2, optimizer offloaded to CPU (DeepSpeed CPU Adam); {_DEEPSPEED_TUNED}",
           runner="lightning", cost="zero2_offload",
           options={"strategy": "deepspeed_stage_2_offload_pinned", "checkpointing": "non_reentrant",
                    "optimizer": "deepspeed_cpu_adam"}),
    Method("lightning_deepspeed_stage_3_offload",
           f"Lightning `deepspeed_stage_3_offload` (DeepSpeed CPU Adam); {_DEEPSPEED_DEFAULTS}",
           runner="lightning", cost="zero3_offload",
           options={"strategy": "deepspeed_stage_3_offload", "checkpointing": "reentrant",
                    "optimizer": "deepspeed_cpu_adam"}),
    Method("lightning_deepspeed_stage_3_offload_pinned",
           "Lightning DeepSpeed ZeRO-3, parameters and optimizer offloaded to CPU, pinned memory (DeepSpeed CPU Adam)"
           ", reentrant checkpointing",
           runner="lightning", cost="zero3_offload",
           options={"strategy": "deepspeed_stage_3_offload_pinned", "checkpointing": "reentrant",
                    "optimizer": "deepspeed_cpu_adam"}),
    # DeepSpeed's config docs, "Parameter offloading" and "Optimizer offloading": `pin_memory: true` for both.
    Method("lightning_deepspeed_stage_3_offload_tuned",
           "Lightning DeepSpeed ZeRO-3, parameters and optimizer offloaded to CPU (DeepSpeed CPU Adam); "
           f"{_DEEPSPEED_TUNED}",
           runner="lightning", cost="zero3_offload",
           options={"strategy": "deepspeed_stage_3_offload_pinned", "checkpointing": "non_reentrant",
                    "optimizer": "deepspeed_cpu_adam"}),
    Method("lightning_fsdp_cpu_offload",
           "Lightning `FSDPStrategy(cpu_offload=True)`, decoder-layer checkpointing; defaults: torch's foreach "
           "CPU AdamW",
           runner="lightning", cost="fsdp_cpu_offload",
           options={"strategy": "fsdp_cpu_offload", "checkpointing": "by_strategy", "optimizer": "adamw"}),
    # torch.optim.AdamW docs: `fused` runs on CPU tensors too; FSDP's CPU offload steps host tensors, where the
    # default is the for-each kernel (configure_optimizers is the user's: passing fused=True is one keyword).
    Method("lightning_fsdp_cpu_offload_fused",
           "Lightning `FSDPStrategy(cpu_offload=True)`, decoder-layer checkpointing; tuned: fused CPU AdamW",
           runner="lightning", cost="fsdp1_cpu_offload_fused",
           options={"strategy": "fsdp_cpu_offload", "checkpointing": "by_strategy", "optimizer": "adamw_fused"}),
]


# Backends whose plan includes what the module would otherwise choose: how many blocks to checkpoint (the
# backend decides) and a loss that never materialises the full logits.
_PLAN_OPTIONS = {"gpu_8bit": {"checkpointing": "by_strategy", "loss": "chunked"},
                 "host_adam": {"checkpointing": "by_strategy", "loss": "chunked"},
                 # The module checkpoints every layer (the planner plans `full`); a 152K vocabulary's fp32 logits
                 # would take ~12 GiB of the GPU, i.e. a dozen resident blocks' worth of host memory.
                 "stream": {"loss": "chunked"}}
# The benchmark's weights are random: recording auto's initial weights would add a second draw pass to each cell's
# start, which no tokens/s row measures.
_BACKEND_OPTIONS = {"stream": {"initial_weights": "on_device"}}
_PLAN_LABELS = {"gpu_8bit": ", blocks checkpointed as memory needs",
                "host_adam": ", checkpointing and the optimizer state's GPU share by the planner",
                "stream": ", resident blocks by the planner"}
_LOSS_LABELS = {"chunked": ", chunked loss", "liger": ", Liger-Kernel's fused linear cross-entropy"}
# More rows of a backend beside its default one: (name suffix, backend options, label[, module options]).
_VARIANTS = {
    # The planner's choice for a module computing its loss with `lightning_offload.losses` (no full logits): what
    # the smaller machines' users run, where a 152K vocabulary's fp32 logits alone would take a 24 GB card's headroom.
    "auto": [("chunked", {}, "", {"loss": "chunked"})],
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
                   "; bf16 weights on NVMe (ZeRO-Infinity)"),
                  # Lightning's DeepSpeedStrategy steps the host optimizer in one sub-group (`sub_group_size=1e12`)
                  # where DeepSpeed's default splits it into 1e9-element ones: the setting its tuned ZeRO-3 row has
                  # and ours does not.
                  ("one_sub_group", {"config": {"zero_optimization": {"sub_group_size": 10**12}}},
                   "; the host optimizer stepped in one sub-group, as Lightning's preset does")],
    "gpu_8bit": [("compiled", {"compile_blocks": True}, "; decoder layers compiled"),
                 # The plan before the planner sized `first_n`: every block recomputed in backward.
                 ("compiled_full_checkpointing", {"compile_blocks": True, "activation_checkpointing": "full"},
                  "; decoder layers compiled, every block checkpointed"),
                 # Liger-Kernel's loss in place of ours (`pip install liger-kernel`): speed and peak side by side.
                 ("compiled_liger", {"compile_blocks": True}, "; decoder layers compiled", {"loss": "liger"})],
    "stream": [("compiled", {"compile_blocks": True}, "; decoder layers compiled")],
}


def ours(backend: str, cost: str, suffix: str = "", backend_options: dict[str, Any] | None = None,
         label: str = "", module_options: dict[str, Any] | None = None) -> Method:
    """A `single_gpu_offload` row; the backend converts the module's plain AdamW to its own optimizer."""
    options = {"strategy": OURS, "backend": backend, "checkpointing": "non_reentrant", "optimizer": "adamw",
               **_PLAN_OPTIONS.get(backend, {}), **(module_options or {})}
    backend_options = {**_BACKEND_OPTIONS.get(backend, {}), **(backend_options or {})}
    if backend_options:
        options["backend_options"] = backend_options
    plan_label = _PLAN_LABELS.get(backend, "") + _LOSS_LABELS.get(options.get("loss", ""), "")
    return Method(f"{OURS}_{backend}" + (f"_{suffix}" if suffix else ""),
                  f'{OURS} (backend="{backend}"{plan_label}{label})',
                  runner="lightning", cost=cost, options=options,
                  runs_on_cpu=options.get("loss") != "liger")  # Liger's kernels are Triton's: CUDA only


def all_methods(our_backends: dict[str, str]) -> dict[str, Method]:
    """The baselines and the rows of each backend of ours (`{backend: cost}`, from bench/matrix.yaml), by name."""
    methods = [*BASELINES]
    for backend, cost in our_backends.items():
        methods.append(ours(backend, cost))
        methods += [ours(backend, cost, *variant) for variant in _VARIANTS.get(backend, [])]
    return {method.name: method for method in methods}
