"""PyTorch FSDP2 (`fully_shard`) on one device, with parameters, gradients and optimizer state in host memory.

Each repeated block (the decoder layer, found by `find_blocks`) is one FSDP unit, so only one block's bf16 weights
are on the device at a time; the LightningModule itself is the root unit holding the rest. With `cpu_offload`, the
optimizer steps fp32 shards in host memory. Optimizers outside `torch.optim` (bitsandbytes' 8-bit ones) do not
accept DTensor parameters ("got mixed torch.Tensor and DTensor"): they are given the local shards instead, whose
gradients are pointed at FSDP's after every backward.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer
from torch.utils import _pytree as pytree

from lightning_offload._distributed import ensure_process_group
from lightning_offload.activation_checkpointing import find_blocks
from lightning_offload.backends.base import Backend, BackendConfig, TrainingSetup
from lightning_offload.backends.spec import BackendSpec, MultiProcess
from lightning_offload.optim import is_adam
from lightning_offload.planner.measure import ModelStats
from lightning_offload.planner.terms import (EIGHT_BIT_OPTIMIZERS, CandidateLevers, MemoryInputs, MemoryTerms, Plan,
                                             StepInputs, StepTime)


@dataclass(kw_only=True)
class FSDPConfig(BackendConfig):
    cpu_offload: bool = True
    """Sharded fp32 parameters, gradients and optimizer state in host memory; the optimizer steps on the CPU."""
    pin_memory: bool = True
    """Page-locked host memory for the offloaded shards: faster copies, memory the OS cannot swap."""
    block_classes: list[str] = field(default_factory=list)
    """Class names of the modules to shard as units (empty: the most repeated composite module)."""
    reshard_after_forward: bool = True
    """Free each block's gathered weights after its forward (re-gathered in backward): less memory, more copies."""
    accumulate_on_gpu: bool | None = None
    """While micro-batches accumulate, add their gradients up on the device in fp32 (4 bytes/param) and send them to
    host memory once per step. FSDP2's CPU offload otherwise copies every micro-batch's gradients synchronously to
    pageable memory and adds them there inside backward (seconds per micro-batch). None: the planner's
    choice (off without a plan)."""


# Attribute naming the precision a module was sharded for (its mixed-precision policy stays with it).
_SHARDED_PRECISION = "_lightning_offload_sharded_precision"

# Key of the per-rank optimizer states in a checkpoint (optimizers that step local shards).
_LOCAL_SHARD_STATES = "local_shard_states"


class _CallThrough(nn.Module):
    """A wrapper whose forward calls the LightningModule, so Lightning routes `training_step` through the root
    unit's `__call__` and FSDP's root hooks run (Lightning redirects steps only when the model is not the module)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


class FSDPBackend(Backend):
    name = "fsdp"
    Config = FSDPConfig
    precisions = ("bf16-mixed", "32-true")
    precision_advice = ". Use 'bf16-mixed' (bf16 compute, fp32 master weights) or '32-true'"
    manual_optimization_refusal = (
        "its gradient accumulation and clipping run on sharded gradients in hooks Lightning's manual loop bypasses."
    )
    callback_refusals = dict.fromkeys(
        ("WeightAveraging", "StochasticWeightAveraging"),
        "its averaged copy is a plain module, which cannot be updated from FSDP2's sharded (DTensor) parameters. "
        "Pin `backend='host_adam'` or `'gpu_8bit'`, or remove the callback.",
    )

    def __init__(self, config: FSDPConfig) -> None:
        super().__init__(config)
        self.config: FSDPConfig = config
        self._device = torch.device("cpu")
        self._precision = "32-true"
        self._local_shards: list[tuple[nn.Parameter, nn.Parameter]] = []
        self._root: nn.Module | None = None

    @property
    def accumulate_on_gpu(self) -> bool:
        """The configured choice, else the planner's (off when no plan ran)."""
        return self.configured_or_planned("accumulate_on_gpu", False)

    def precision_plugin(self, plugins: ModuleType, precision: str, trainer_plugin: Any) -> Any:
        # FSDP2's MixedPrecisionPolicy casts parameters and inputs itself; Lightning must not autocast on top.
        backend = self

        class ClipsShardedGradients(plugins.Precision):
            def main_params(self, optimizer: Optimizer) -> Any:
                # The norm to clip by is the whole model's: the sharded parameters' norm is reduced across ranks,
                # a local shard's is not.
                return backend.clipped_parameters(optimizer)

        return ClipsShardedGradients()

    def clipped_parameters(self, optimizer: Optimizer) -> list[nn.Parameter]:
        if self._local_shards:
            return [sharded for sharded, _ in self._local_shards]
        return [p for group in optimizer.param_groups for p in group["params"]]

    def setup_environment(self, device: torch.device) -> None:
        self._device = device
        ensure_process_group(device)

    def optimizer_state_device(self, device: torch.device) -> torch.device:
        return torch.device("cpu") if self.config.cpu_offload else device

    def prepare_module(self, module: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        if isinstance(module, FSDPModule):
            sharded_for = getattr(module, _SHARDED_PRECISION, self._precision)
            if sharded_for != self._precision:
                raise ValueError(
                    f"{type(module).__name__} was sharded by an earlier `fit` for `precision={sharded_for!r}`, which "
                    f"FSDP2 keeps: it cannot train with {self._precision!r}. Fit it with `precision={sharded_for!r}`, "
                    "or build a fresh module."
                )
            # A forward without backward (the last validation) leaves the root unit's parameters unsharded:
            # `configure_optimizers` must see the sharded ones, or the optimizer steps copies FSDP never reads.
            _reshard(module)
            self._root = module
            return module
        mixed = self._precision == "bf16-mixed"
        options = dict(
            mesh=init_device_mesh(self._device.type, (dist.get_world_size(),)),
            mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16 if mixed else None,
                                           reduce_dtype=torch.float32 if mixed else None),
            # Pinning is a property of host memory seen from an accelerator; with none, the shards are plain memory.
            offload_policy=CPUOffloadPolicy(pin_memory=self.config.pin_memory and self._device.type == "cuda")
            if self.config.cpu_offload
            else OffloadPolicy(),
        )
        if not self.config.cpu_offload:
            module.to(self._device)
        blocks = find_blocks(module, self.config.block_classes)
        if not blocks:
            warnings.warn(
                f"No repeated block found in {type(module).__name__}: the `fsdp` backend shards it as one unit, so "
                "all its weights are gathered on the device at once. Name the block class with `block_classes=`."
            )
        for group in _shardable_block_groups(module, blocks):
            fully_shard(group if len(group) > 1 else group[0], reshard_after_forward=self.config.reshard_after_forward,
                        **options)
            for block in group:  # ahead of FSDP's own post-forward hook, which hooks the outputs
                block.register_forward_hook(_outputs_that_own_their_memory, prepend=True)
        fully_shard(module, **options)
        if dist.get_backend() == "gloo":
            # gloo cannot average in a reduce-scatter: torch 2.8's FSDP2 asks it to and gets the ranks' sum, so the
            # gradients (and the norm clipping sees) were the world size times too large. Sum, then divide.
            for unit in module.modules():
                if isinstance(unit, FSDPModule):
                    unit.set_force_sum_reduction_for_comms(True)
        setattr(module, _SHARDED_PRECISION, self._precision)
        self._root = module
        return module

    def prepare_optimizer(self, optimizer: Optimizer) -> Optimizer:
        self._local_shards = []  # a later fit brings a new optimizer: the previous one's shards are not stepped
        if type(optimizer).__module__.startswith("torch.optim"):
            _fused_on_host(optimizer)
            return optimizer
        # The optimizer has not stepped yet, so its (empty) state needs no moving when its params are swapped.
        for group in optimizer.param_groups:
            shards = [nn.Parameter(p.to_local(), requires_grad=p.requires_grad) for p in group["params"]]
            self._local_shards += zip(group["params"], shards)
            group["params"] = shards
        zero_grad = optimizer.zero_grad

        def zero_grad_everywhere(set_to_none: bool = True) -> None:
            zero_grad(set_to_none)
            for sharded, _ in self._local_shards:
                sharded.grad = None

        optimizer.zero_grad = zero_grad_everywhere  # type: ignore[method-assign]
        return optimizer

    def before_backward(self, last_micro_batch: bool) -> None:
        # FSDP2's own gradient accumulation without reduction: the unsharded gradients add up on the device in the
        # reduce dtype, and the last micro-batch reduces (and offloads) the sum.
        if self.accumulate_on_gpu and self._root is not None:
            self._root.set_requires_gradient_sync(last_micro_batch)

    def after_backward(self) -> None:
        for sharded, local in self._local_shards:
            local.grad = None if sharded.grad is None else sharded.grad.to_local()

    def setup_training(
        self, module: nn.Module, optimizer: Optimizer, setup: TrainingSetup
    ) -> tuple[nn.Module, Optimizer]:
        return _CallThrough(module), optimizer

    def setup_inference(self, module: nn.Module, precision: str) -> nn.Module:
        self.set_precision(precision)
        return _CallThrough(self.prepare_module(module))

    def model_state_dict(self, module: nn.Module) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Plain full tensors on the CPU: the checkpoint loads into the module without FSDP.
        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_model_state_dict(self, module: nn.Module, state_dict: dict[str, Any], strict: bool) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        _reshard(module)  # loads into the sharded parameters, which a forward without backward leaves unregistered
        set_model_state_dict(module, state_dict, options=StateDictOptions(full_state_dict=True, strict=strict))

    def optimizer_state_dict(self, module: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
        if self._local_shards:
            # Each rank's optimizer state belongs to its own shards (8-bit blocks cut along them); the checkpoint
            # keeps every rank's, in rank order (gathered on rank 0, which writes it; over the CPU group).
            states = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
            dist.gather_object(optimizer.state_dict(), states, dst=0)
            return {_LOCAL_SHARD_STATES: states}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(module, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state_dict(self, module: nn.Module, optimizer: Optimizer, state: dict[str, Any]) -> None:
        if self._local_shards:
            states = state.get(_LOCAL_SHARD_STATES, [state])
            if len(states) != dist.get_world_size():
                raise ValueError(
                    f"The checkpoint holds `{type(optimizer).__name__}` state for {len(states)} process(es) and this "
                    f"run has {dist.get_world_size()}: that optimizer steps each process's shard of the weights, so "
                    f"its state resumes only with the same number (`devices` x `num_nodes` = {len(states)}). "
                    "A `torch.optim` optimizer (e.g. `optimizer=adamw`) resumes with any number."
                )
            optimizer.load_state_dict(states[dist.get_rank()])
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if not optimizer.state:
            # torch builds the empty state it loads into by a zero step, which it skips while gradients an earlier
            # `fit` of this module left are there; training clears them before its first backward anyway.
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None

        set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def describe(self) -> str:
        where = "host memory (optimizer steps on the CPU)" if self.config.cpu_offload else str(self._device)
        ranks = dist.get_world_size() if dist.is_initialized() else 1
        sharding = f"sharded across {ranks} processes" if ranks > 1 else "one unit per block"
        return f"FSDP2 ({self._precision}), {sharding}: parameters, gradients and optimizer state in {where}"


def _shardable_block_groups(root: nn.Module, blocks: list[nn.Module]) -> list[list[nn.Module]]:
    """The blocks in groups such that no parameter is in two units: FSDP2 manages a weight in one unit only, so
    blocks that share one (a weight tied across layers) are sharded together, and blocks that share one with a
    module outside the blocks are left to the root unit."""
    groups: list[tuple[list[nn.Module], set[int]]] = []
    for block in blocks:
        ids = {id(p) for p in block.parameters()}
        sharing = [group for group in groups if group[1] & ids]
        merged = ([m for modules, _ in sharing for m in modules] + [block],
                  ids.union(*(held for _, held in sharing)))
        groups = [group for group in groups if all(group is not other for other in sharing)] + [merged]
    inside_blocks = {id(m) for block in blocks for m in block.modules()}
    outside = {id(p) for m in root.modules() if id(m) not in inside_blocks for p in m.parameters(recurse=False)}
    names = {id(m): name for name, m in root.named_modules()}
    for modules, held in groups:
        if held & outside:
            warnings.warn(
                f"{[names[id(m)] for m in modules]} share a weight with a module outside the blocks: the `fsdp` "
                "backend shards them with the rest of the model as one unit, so their weights are gathered together."
            )
    order = {id(block): index for index, block in enumerate(blocks)}
    return sorted((sorted(modules, key=lambda m: order[id(m)]) for modules, held in groups if not held & outside),
                  key=lambda modules: order[id(modules[0])])


@torch.compiler.disable
def _outputs_that_own_their_memory(module: nn.Module, args: Any, output: Any) -> Any:
    """A block's outputs that are views, copied: FSDP2 gathers a block's weights for backward from a hook on its
    outputs, which an in-place op on a view (`h = block(x); h += x`) drops; backward then fails on sharded weights."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.clone() if t._base is not None and t.requires_grad else t,
                                output)


def _reshard(module: nn.Module) -> None:
    from torch.distributed.fsdp import FSDPModule

    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


def _fused_on_host(optimizer: Optimizer) -> None:
    """Steps torch's Adam/AdamW with its fused kernel when the user left the implementation to torch.

    torch defaults to its fused or foreach kernels only for CUDA tensors; for these host shards its default is the
    per-parameter loop, several times slower (bench/RESULTS.md, "Notes moved from the changelog"). Same
    arithmetic; an optimizer that has stepped keeps its implementation.
    """
    if not is_adam(optimizer, exact=True) or optimizer.state:
        return
    if any(group.get("fused") is not None or group.get("foreach") is not None or group.get("capturable")
           or group.get("differentiable") for group in optimizer.param_groups):
        return
    for group in optimizer.param_groups:
        group["fused"] = True
    optimizer.defaults["fused"] = True


# FSDP2 pins its host shards through torch's caching host allocator, which rounds every block up to a power of two:
# this share on top of the 8 pinned bytes/param (bench/RESULTS.md, "Calibration constants").
PINNED_ROUNDING = 0.40
# bitsandbytes' 8-bit optimizers on host tensors (FSDP's CPU-offloaded shards) dequantize the parameter being
# stepped to fp32 state and temporaries, one parameter at a time (the GPU kernels need none)
# (bench/RESULTS.md, "Calibration constants").
HOST_EIGHT_BIT_UPDATE_BYTES_PER_ELEMENT = 20
# FSDP2's CPU offload adds a micro-batch's gradients to those already in host memory inside backward: each one is
# copied synchronously into fresh pageable memory, then added on the CPU (torch's `foreach_reduce`: the copy can
# only overlap when nothing accumulates) (bench/RESULTS.md, "Calibration constants").
HOST_ACCUMULATION_RATE = 0.29e9
# bitsandbytes' 8-bit optimizers on CPU tensors run element by element in Python-side loops
# (bench/RESULTS.md, "Calibration constants").
CPU_8BIT_UPDATE_RATE = 0.06e9


def memory_terms(inputs: MemoryInputs) -> MemoryTerms:
    # Frozen parameters take no gradient and no optimizer state: torch's optimizers skip what gets no gradient.
    stats, plan = inputs.stats, inputs.plan
    params, block, trained = stats.parameters, stats.block_parameters, stats.trainable_parameters
    weights, size = inputs.weights  # FSDP2 gathers the shards in the compute dtype
    gpu = {f"gathered {weights} weights (two blocks)": 2 * size * block,
           f"root unit {weights} weights (embeddings, head)": size * stats.other_parameters,
           "fp32 gradients of one block before offload": 4 * stats.trainable_block_parameters}
    if plan.accumulate_on_gpu and inputs.whole_gradients:
        gpu["fp32 gradients accumulated over micro-batches"] = 4 * trained
    host = {"fp32 weight shards": 4 * params, "fp32 gradient shards": 4 * trained,
            "optimizer state": int(inputs.state_bytes * trained)}
    pinned: frozenset[str] = frozenset()
    if plan.optimizer in EIGHT_BIT_OPTIMIZERS:
        largest = max(block, stats.embedding_parameters)  # no parameter is larger than its block
        host["8-bit update temporaries (largest parameter)"] = HOST_EIGHT_BIT_UPDATE_BYTES_PER_ELEMENT * largest
    if plan.pin_memory:
        host["pinned block rounding"] = int(PINNED_ROUNDING * 8 * params)
        pinned = frozenset({"fp32 weight shards", "fp32 gradient shards", "pinned block rounding"})
    return MemoryTerms(gpu, host, pinned)


def step_time(inputs: StepInputs) -> StepTime:
    """fp32 shards come in for every unshard, fp32 gradients go out once per step (the earlier micro-batches' are
    added up on the GPU, or in host memory at FSDP's rate); torch's AdamW steps on the CPU after."""
    params, plan, accumulate = inputs.stats.parameters, inputs.plan, inputs.accumulate
    weights_in = accumulate * inputs.passes * 4 * params / inputs.h2d
    gradients_out = 4 * params / inputs.d2h
    added_on_host = 0 if plan.accumulate_on_gpu else (accumulate - 1) * params / HOST_ACCUMULATION_RATE
    # The fsdp backend steps torch's fused AdamW on the host shards: the fused CPU AdamW rate after the copies
    # (bench/RESULTS.md, "Calibration constants").
    rate = inputs.cpu_adamw if plan.exact_optimizer else CPU_8BIT_UPDATE_RATE
    optimizer = params / rate
    return StepTime(inputs.compute, weights_in + gradients_out + added_on_host + inputs.offload, optimizer,
                    max(inputs.compute, weights_in + inputs.offload) + gradients_out + added_on_host + optimizer)


def plan_variants(base: Plan, stats: ModelStats, levers: CandidateLevers) -> list[Plan]:
    """With gradient accumulation: the micro-batches' gradients added up on the GPU, or in host memory."""
    if levers.accumulate > 1:
        return [dataclasses.replace(base, accumulate_on_gpu=True), base]
    return [base]


SPEC = BackendSpec(
    name="fsdp", engine=FSDPBackend, memory_terms=memory_terms, step_time=step_time, checkpoint_weight_bytes=4,
    exact_optimizer="adamw", eight_bit_optimizer="adamw8bit",
    # bitsandbytes' paged optimizers page GPU state: the shards it would step are in host memory.
    pinned_optimizer=lambda optimizer: None if optimizer == "paged_adamw8bit" else optimizer,
    plan_variants=plan_variants, options_of=lambda plan: {"accumulate_on_gpu": plan.accumulate_on_gpu},
    multi_process=MultiProcess(shards_state=True), runs_compiled_modules=True,
)
