"""`gpu_8bit`: no offload; bf16 weights and 8-bit AdamW state on the device, each parameter updated inside backward.

The plan for models up to ~15B on an 80 GB GPU: 2 bytes a parameter of weights, 2.06 of AdamW state
(`kernels.adamw8bit`), and no gradient buffer, because each parameter's fused update runs in a post-accumulate-grad
hook as soon as its gradient is final and frees that gradient (`kernels.in_backward`). bf16 weights are written
with stochastic rounding, so updates smaller than half a bf16 ulp still move them.

Precision: the weights are bf16 under `precision="bf16-true"` and also under `"bf16-mixed"`, which would otherwise
mean an fp32 master copy: this plan replaces that copy by stochastic rounding, so "mixed" trains as "true" (bf16
compute, fp32 loss). `"32-true"` keeps fp32 weights (4 bytes a parameter) with the same 8-bit state. fp16 is refused.

With `accumulate_grad_batches > 1`, gradients accumulate in `.grad` on the device and the update runs inside the
last micro-batch's backward. Gradient clipping (`gradient_clip_val`) is exact but moves the updates after backward:
clipping by norm needs every gradient before the first update, and Lightning clips by value after backward too, so
the gradients are held until Lightning has clipped them (2 more bytes a parameter, which the planner counts), and a
warning says so.

Activation checkpointing: `checkpoint_blocks=k` recomputes k blocks in backward; by default just as many as the
device's free memory needs (`blocks_to_checkpoint`, decided from the first block's measured activations in the first
training forward); a policy pinned with the strategy's `activation_checkpointing=` is used as it is.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_offload.activation_checkpointing import find_blocks, is_checkpointed, recompute_in_backward
from lightning_offload.backends.base import Backend, BackendConfig, TrainingSetup
from lightning_offload.backends.init_functions import drawing_in, wrapped_init_functions
from lightning_offload.backends.spec import BackendSpec
from lightning_offload.optim import decouples_weight_decay, is_adam
from lightning_offload.planner.budget import gpu_free_bytes
from lightning_offload.planner.terms import ADAMW_8BIT, MemoryInputs, MemoryTerms, step_updated_on_the_gpu

_PRECISIONS = {"bf16-true": torch.bfloat16, "bf16-mixed": torch.bfloat16, "32-true": torch.float32}
# Optimizers whose math is AdamW, by (module prefix, class name); their hyperparameters carry over.
_ADAMW_CLASSES = {
    ("torch.optim", "AdamW"), ("torch.optim", "Adam"), ("lightning_offload.kernels", "AdamW8bitFused"),
    ("bitsandbytes.optim", "AdamW"), ("bitsandbytes.optim", "AdamW8bit"), ("bitsandbytes.optim", "PagedAdamW"),
    ("bitsandbytes.optim", "PagedAdamW8bit"),
}
_HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay", "initial_lr")


def blocks_to_checkpoint(free_bytes: int, block_activation_bytes: int, num_blocks: int,
                         checkpointed_block_bytes: int = 0) -> int:
    """How many of `num_blocks` equal blocks must recompute their activations so that the activations saved for
    backward fit in `free_bytes`.

    A block that is not checkpointed keeps `block_activation_bytes`; a checkpointed one keeps only its input
    (`checkpointed_block_bytes`) but, while it is recomputed in backward, needs one block's activations on top.
    Returns `num_blocks` when even that does not fit (the caller decides whether to refuse).
    """
    if num_blocks <= 0 or num_blocks * block_activation_bytes <= free_bytes:
        return 0
    saving = block_activation_bytes - checkpointed_block_bytes
    if saving <= 0:
        return num_blocks
    excess = (num_blocks + 1) * block_activation_bytes - free_bytes
    return min(num_blocks, max(1, math.ceil(excess / saving)))


@dataclass(kw_only=True)
class GPU8bitConfig(BackendConfig):
    checkpoint_blocks: int | None = None
    """Blocks whose activations are recomputed in backward (the last k of `find_blocks`): 0 none, None as many as
    the device's free memory needs (none on a CPU without `activation_budget_bytes`)."""
    activation_budget_bytes: int | None = None
    """With `checkpoint_blocks=None`: bytes the saved activations may take; None: the device's free memory at the
    first block's first forward, less `headroom_bytes` and twice the largest parameter (its gradient in flight)."""
    headroom_bytes: int = 2 * 2**30
    """Kept free for backward's temporaries, the loss and the allocator's fragmentation."""
    stochastic_rounding: bool = True
    """Write bf16 weights with stochastic rounding (False: round to nearest, which drops updates below half an ulp)."""

    def __post_init__(self) -> None:
        if self.checkpoint_blocks is not None and self.checkpoint_blocks < 0:
            raise ValueError(f"`checkpoint_blocks` must be >= 0 or None, got {self.checkpoint_blocks}.")


class GPU8bitBackend(Backend):
    name = "gpu_8bit"
    Config = GPU8bitConfig
    manual_optimization_refusal = "it updates each parameter inside backward (or at its end), not at `opt.step()`."
    precisions = tuple(_PRECISIONS)
    precision_advice = (", whose fused 8-bit AdamW updates bf16 or fp32 weights. Use 'bf16-true' (or 'bf16-mixed', "
                        "trained the same way) or '32-true'")

    def __init__(self, config: GPU8bitConfig) -> None:
        super().__init__(config)
        self.config: GPU8bitConfig = config
        self._device = torch.device("cpu")
        self._precision = "bf16-true"
        self._optimizer: Any = None
        self._defer_updates = False
        self._planning_hooks: list[Any] = []
        self._recomputed: set[nn.Module] = set()  # blocks this backend checkpointed (a second fit finds them wrapped)
        self.checkpointed_blocks: int | str = "not decided"
        """Blocks recomputed in backward: a number, "policy" when pinned by the strategy, or not decided yet."""

    def precision_plugin(self, plugins: ModuleType, precision: str, trainer_plugin: Any) -> Any:
        # bf16 weights either way (see the module's docstring): no autocast, inputs and init in bf16.
        return plugins.HalfPrecision("bf16-true") if precision == "bf16-mixed" else trainer_plugin

    def setup_environment(self, device: torch.device) -> None:
        self._device = device

    def model_init_context(self) -> AbstractContextManager:
        # Everything lives on the device: build it there (in bf16, by the precision plugin's context), never as an
        # fp32 copy in host memory first.
        if self._precision != "bf16-mixed":
            return torch.device(self._device)
        # Without the strategy "bf16-mixed" builds the model in fp32: its init draws those numbers, rounded once.
        return _entered_together(torch.device(self._device), wrapped_init_functions(drawing_in(torch.float32)))

    def prepare_optimizer(self, optimizer: Optimizer) -> Optimizer:
        from lightning_offload.kernels.in_backward import InBackwardAdamW8bit

        _refuse_other_math(optimizer)
        groups = [{key: value for key, value in group.items()
                   if key == "params" or key in _HYPERPARAMETERS or key not in optimizer.defaults}
                  for group in optimizer.param_groups]
        defaults = optimizer.defaults
        return InBackwardAdamW8bit(groups, lr=float(defaults.get("lr", 1e-3)),
                                   betas=tuple(defaults.get("betas", (0.9, 0.999))), eps=defaults.get("eps", 1e-8),
                                   weight_decay=defaults.get("weight_decay", 0.0),
                                   stochastic_rounding=self.config.stochastic_rounding)

    def setup_training(
        self, module: nn.Module, optimizer: Optimizer, setup: TrainingSetup
    ) -> tuple[nn.Module, Optimizer]:
        module = module.to(self._device)
        self._optimizer = optimizer
        # Lightning calls `on_before_optimizer_step` and clips the gradients after the closure, before
        # `optimizer.step` updates what still has one.
        readers = [*(["`gradient_clip_val`"] if setup.gradient_clip_val else []),
                   *(f"{hook}'s `on_before_optimizer_step`" for hook in setup.gradient_hooks)]
        self._defer_updates = bool(readers)
        if self._defer_updates:
            warnings.warn(
                f"{' and '.join(readers)} with the `gpu_8bit` backend: clipping by norm needs every gradient before "
                "the first update, Lightning clips by value after backward, and a hook reads them all: parameters are "
                "updated after backward and their gradients are held until then (2 bytes/parameter more on the "
                "device). Drop them to update inside backward.",
                stacklevel=2,
            )
        optimizer.allocate_state()
        optimizer.attach()
        self._plan_checkpointing(module)
        return module, optimizer

    def setup_inference(self, module: nn.Module, precision: str) -> nn.Module:
        return module.to(self._device)

    def updates_inside_backward(self) -> bool:
        return not self._defer_updates

    def before_backward(self, last_micro_batch: bool) -> None:
        if self._optimizer is not None:
            self._optimizer.updates_in_backward = last_micro_batch and not self._defer_updates

    def teardown(self) -> None:
        if self._optimizer is not None:
            self._optimizer.detach()
        self._remove_planning_hooks()

    def describe(self) -> str:
        weights = "bf16" if _PRECISIONS[self._precision] == torch.bfloat16 else "fp32"
        return (f"no offload: {weights} weights and 8-bit AdamW state on {self._device}, each parameter updated "
                f"inside backward (no gradient buffer); activation checkpointing: "
                f"{'as memory needs' if self.config.checkpoint_blocks is None else self.config.checkpoint_blocks}")

    def _plan_checkpointing(self, module: nn.Module) -> None:
        if isinstance(self.checkpointed_blocks, int):  # decided in an earlier fit of the same model
            return
        blocks = find_blocks(module)
        pinned = any(is_checkpointed(m) and m not in self._recomputed for m in module.modules())
        if pinned:
            if self.config.checkpoint_blocks is not None:
                raise ValueError(
                    "The model's blocks are already checkpointed (the strategy's `activation_checkpointing=`, or "
                    "`transformers`' `gradient_checkpointing_enable()`) and the `gpu_8bit` option `checkpoint_blocks` "
                    "is set too. Set one of them."
                )
            self.checkpointed_blocks = "policy"
        elif self.config.checkpoint_blocks is not None:
            self._checkpoint_last(blocks, self.config.checkpoint_blocks)
        elif self.config.activation_budget_bytes is None and self._device.type != "cuda":
            self._checkpoint_last(blocks, 0)
        elif blocks:
            self._measure_first_block(blocks, module)

    def _checkpoint_last(self, blocks: list[nn.Module], count: int) -> None:
        from lightning.pytorch.utilities.rank_zero import rank_zero_info

        for block in blocks[len(blocks) - count:] if count else []:
            recompute_in_backward(block, by_fit=True)
            self._recomputed.add(block)
        self.checkpointed_blocks = min(count, len(blocks))
        rank_zero_info(f"`gpu_8bit`: {self.checkpointed_blocks} of {len(blocks)} blocks recompute their activations")

    def _measure_first_block(self, blocks: list[nn.Module], module: nn.Module) -> None:
        """Counts what the first block saves for backward in the first training forward, then checkpoints as many
        of the remaining blocks as the free memory needs (the first block has run by then; it stays as it is)."""
        parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
        largest_parameter = max((p.numel() * p.element_size() for p in module.parameters()), default=0)
        saved: dict[int, int] = {}
        counting: list[AbstractContextManager] = []

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameters:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        def before(block: nn.Module, args: tuple) -> None:
            # Grad mode, not `block.training`: `from_pretrained` gives a model in eval mode, which Lightning keeps.
            if torch.is_grad_enabled():
                counting.append(torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor))
                counting[-1].__enter__()

        def after(block: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            if not counting:
                return
            counting.pop().__exit__(None, None, None)
            first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            input_bytes = 0 if first is None else first.numel() * first.element_size()
            budget = self.config.activation_budget_bytes
            if budget is None:
                budget = _free_device_bytes(self._device) - self.config.headroom_bytes - 2 * largest_parameter
            self._checkpoint_last(blocks[1:], blocks_to_checkpoint(budget, sum(saved.values()), len(blocks) - 1,
                                                                   input_bytes))
            self._remove_planning_hooks()

        self._planning_hooks = [blocks[0].register_forward_pre_hook(before), blocks[0].register_forward_hook(after, with_kwargs=True)]

    def _remove_planning_hooks(self) -> None:
        for handle in self._planning_hooks:
            handle.remove()
        self._planning_hooks = []


def _free_device_bytes(device: torch.device) -> int:
    return gpu_free_bytes(device) + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _refuse_other_math(optimizer: Optimizer) -> None:
    cls = type(optimizer)
    is_adamw = any(cls.__module__.startswith(prefix) and cls.__name__ == name for prefix, name in _ADAMW_CLASSES)
    flags = [flag for flag in ("amsgrad", "maximize") if any(g.get(flag) for g in optimizer.param_groups)]
    l2_decay = is_adam(optimizer, exact=True) and not decouples_weight_decay(optimizer) and any(
        g.get("weight_decay") for g in optimizer.param_groups)
    if not is_adamw or flags or l2_decay:
        what = f"{cls.__name__}" + (f" with {', '.join(f'{f}=True' for f in flags)}" if flags else "") + (
            " with (L2) weight_decay" if l2_decay else "")
        raise ValueError(
            f"The `gpu_8bit` backend runs AdamW (decoupled weight decay) with 8-bit state, not {what}. Return "
            "`torch.optim.AdamW` from `configure_optimizers`, or keep your optimizer with `backend='device'`."
        )


def memory_terms(inputs: MemoryInputs) -> MemoryTerms:
    # The 8-bit AdamW keeps state for every parameter it holds, frozen ones included: charged for all.
    stats, (weights, size) = inputs.stats, inputs.weights
    return MemoryTerms({f"{weights} weights": size * stats.parameters,
                        "optimizer state": int(inputs.state_bytes * stats.parameters),
                        **inputs.gradients_updated_in_backward(stats.trainable_block_parameters)})


SPEC = BackendSpec(
    name="gpu_8bit", engine=GPU8bitBackend, memory_terms=memory_terms, step_time=step_updated_on_the_gpu,
    checkpoint_weight_bytes=2, eight_bit_optimizer="adamw8bit_fused",
    pinned_optimizer=lambda optimizer: "adamw8bit_fused" if optimizer in ADAMW_8BIT else None, own_adamw=True,
    holds_gradients_to_clip_by_value=True,
)


@contextmanager
def _entered_together(*contexts: AbstractContextManager) -> Iterator[None]:
    with ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield
