"""Activation-checkpointing policies: which blocks of a model drop their activations and recompute them in backward.

Each policy is a small class with `apply(model)`; blocks are found by `find_blocks` (the module class that repeats
most, e.g. a decoder layer), the same detection the FSDP backend uses to shard. Blocks are wrapped in place (their
`forward` is replaced), so parameter names and checkpoints do not change. `first_n` recomputes the first n blocks:
the last ones keep their activations, which backward frees before the first recompute. `offload` recomputes nothing:
it moves the blocks' saved tensors to host memory and back, under compute (`activation_offload`).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Generator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_offload.activation_offload import ActivationOffloader

# `auto`: the planner (`SingleGPUOffloadStrategy(backend=...)` at setup) picks one of the others.
POLICIES = ("auto", "none", "full", "every_k", "first_n", "selective", "offload")
_WRAPPED = "_lightning_offload_checkpointing"
# The names transformers' blocks take a key/value cache under.
_CACHE_ARGUMENTS = frozenset({"cache", "layer_past", "past_key_value", "past_key_values"})
_OFFLOADER = "_lightning_offload_activation_offloader"
# The wrapper a fit installed (a policy's, or a backend's checkpointing as memory needs), kept on the block so the
# next fit of the same model in the process (a notebook, a sweep) can take it off and apply its own settings.
_INSTALLED_BY_FIT = "_lightning_offload_installed_by_fit"


def find_blocks(model: nn.Module, class_names: Sequence[str] = ()) -> list[nn.Module]:
    """The repeated blocks of `model`: instances of `class_names`, or else of the repeated composite module class
    whose instances hold the most parameters together and share none (the decoder layer over its MLP, and over the
    more numerous but small LoRA layers and containers inside it)."""
    if class_names:
        blocks = [m for m in model.modules() if type(m).__name__ in set(class_names)]
        if not blocks:
            raise ValueError(f"No module of class {list(class_names)} in {type(model).__name__}.")
        return blocks
    # Containers without a forward (a T5 block's list of layers) cannot be run, sharded or recomputed as a unit.
    composites = [m for m in model.modules() if m is not model and any(True for _ in m.children())
                  and not isinstance(m, (nn.ModuleList, nn.ModuleDict))]
    counts = {cls: count for cls, count in Counter(type(m) for m in composites).items()
              if count > 1 and not _instances_share_parameters([m for m in composites if type(m) is cls])}
    if not counts:
        return []
    size = {cls: _parameter_count(next(m for m in composites if type(m) is cls)) for cls in counts}
    best = max(counts, key=lambda cls: (counts[cls] * size[cls], counts[cls]))
    return [m for m in composites if type(m) is best]


def _instances_share_parameters(instances: list[nn.Module]) -> bool:
    # Units that share a weight (T5's encoder and decoder stacks share the embedding) cannot be sharded, streamed or
    # recomputed one at a time.
    seen: set[int] = set()
    for module in instances:
        own = {id(p) for p in module.parameters()}
        if own & seen:
            return True
        seen |= own
    return False


def _parameter_count(module: nn.Module) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def _wrap_forward(module: nn.Module, run: Any, *, by_fit: bool = False) -> None:
    if getattr(module, _WRAPPED, False):
        return
    forward = module.forward

    @functools.wraps(forward)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return run(forward, *args, **kwargs)

    module.forward = wrapped
    setattr(module, _WRAPPED, True)
    if by_fit:
        setattr(module, _INSTALLED_BY_FIT, wrapped)


def _recompute(forward: Any, *args: Any, **kwargs: Any) -> Any:
    # Non-reentrant: works with keyword arguments, with inputs that need no grad, and under engine hooks. The
    # recompute runs in backward, outside Lightning's precision context: it gets the forward's default dtype back
    # (bf16 under `bf16-true` and DeepSpeed), as `checkpoint` itself restores autocast, so tensors a block creates
    # come out as they did in forward.
    dtype = torch.get_default_dtype()
    if torch.is_grad_enabled():
        kwargs = _without_cache(kwargs)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), default_dtype(dtype)),
                      **kwargs)


def _without_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A key/value cache the block writes in forward would be written again, and found already filled, by the
    recompute in backward (which then saves other tensors than the forward did): as transformers' own gradient
    checkpointing does, a block that is recomputed runs without one."""
    return {name: (None if name in _CACHE_ARGUMENTS and value is not None else
                   False if name == "use_cache" and value else value) for name, value in kwargs.items()}


@contextmanager
def default_dtype(dtype: torch.dtype) -> Generator[None, None, None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def recompute_in_backward(block: nn.Module, *, by_fit: bool = False) -> None:
    """Checkpoints one block: its activations are dropped after forward and recomputed in backward. `by_fit`: a
    fit's plan checkpoints it, and the next fit takes it off again (`remove_fit_checkpointing`); otherwise the block
    counts as one that checkpoints itself, which the policies leave alone."""
    _wrap_forward(block, _recompute, by_fit=by_fit)


def remove_fit_checkpointing(model: nn.Module) -> int:
    """Takes the checkpointing and activation-offload wrappers an earlier fit installed off `model`'s blocks (those
    of the user's model, e.g. `gradient_checkpointing_enable()`, stay), so a new fit plans and applies its own
    settings instead of inheriting the last fit's as if the model checkpointed itself. A wrapper that something
    wrapped again afterwards (a streaming engine's) stays. Returns how many were taken off."""
    removed = 0
    for module in model.modules():
        wrapper = module.__dict__.get(_INSTALLED_BY_FIT)
        if wrapper is None or module.__dict__.get("forward") is not wrapper:
            continue
        original = wrapper.__wrapped__
        bound_class_forward = getattr(original, "__func__", None) is type(module).forward
        if bound_class_forward and getattr(original, "__self__", None) is module:
            del module.forward  # the class's own forward again, as before the first fit
        else:
            module.forward = original
        for name in (_WRAPPED, _OFFLOADER, _INSTALLED_BY_FIT):
            module.__dict__.pop(name, None)
        removed += 1
    return removed


def is_checkpointed(module: nn.Module) -> bool:
    """Whether `module` already recomputes itself: a policy (or `recompute_in_backward`) wrapped it, or its model
    turned on `transformers`' own gradient checkpointing (`gradient_checkpointing_enable()`), which checkpoints each
    decoder layer inside its call. Policies leave such blocks alone: a second checkpoint would recompute them twice,
    and offloading inside one would copy every recomputed activation out and back again."""
    return bool(getattr(module, _WRAPPED, False)) or getattr(module, "gradient_checkpointing", False) is True


def checkpoints_itself(model: nn.Module) -> bool:
    """Whether every repeated block of `model` recomputes itself (`is_checkpointed`): whatever policy a run asks
    for, its blocks then run as under `full`."""
    blocks = find_blocks(model)
    return bool(blocks) and all(is_checkpointed(block) for block in blocks)


def unwrapped_forward(module: nn.Module) -> Any:
    """`module.forward` without a policy's recompute wrapper (`recompute_in_backward`), if it has one."""
    forward = module.forward
    return getattr(forward, "__wrapped__", forward) if getattr(module, _WRAPPED, False) else forward


@contextmanager
def recompute_suspended(blocks: Sequence[nn.Module]) -> Generator[None, None, None]:
    """The blocks run as if never checkpointed for the duration (their policy wrapper and transformers' own
    checkpointing set aside), so a measurement sees what each saves without recompute."""
    undo: list[Any] = []
    for block in blocks:
        if getattr(block, "gradient_checkpointing", False) is True:
            block.gradient_checkpointing = False
            undo.append(functools.partial(setattr, block, "gradient_checkpointing", True))
        if getattr(block, _WRAPPED, False):
            wrapped = block.forward
            block.forward = unwrapped_forward(block)
            undo.append(functools.partial(setattr, block, "forward", wrapped))
    try:
        yield
    finally:
        for restore in reversed(undo):
            restore()


def activation_offloader(model: nn.Module) -> ActivationOffloader | None:
    """The offloader `policy='offload'` installed in `model` (its pool, counters and trace), if any."""
    return next((getattr(m, _OFFLOADER) for m in model.modules() if hasattr(m, _OFFLOADER)), None)


@dataclass(kw_only=True)
class CheckpointingConfig:
    policy: str = "none"
    """One of `POLICIES`: auto (the planner's choice), none, full (every block), every_k, first_n, selective (by
    class name), offload (to host memory)."""
    every_k: int = 2
    """With `every_k`: checkpoint blocks 0, k, 2k, ...: about 1/k of full checkpointing's memory saving and recompute."""
    first_n: int | None = None
    """With `first_n`: checkpoint the first n blocks (at most the model's): n/blocks of full checkpointing's memory
    saving and recompute. None: as many as memory needs, sized by the planner (every block where none plans it)."""
    module_classes: list[str] = field(default_factory=list)
    """With `selective`: class names to checkpoint; elsewhere: the block classes (empty: detected)."""
    offload_min_bytes: int = 2**20
    """With `offload`: saved tensors smaller than this stay on the device (a copy of them costs more than it saves)."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"Unknown activation checkpointing policy {self.policy!r}. Choose one of {list(POLICIES)}.")
        if self.offload_min_bytes < 0:
            raise ValueError(f"`offload_min_bytes` must be at least 0, got {self.offload_min_bytes}.")
        if self.every_k < 1:
            raise ValueError(f"`every_k` must be at least 1, got {self.every_k}.")
        if self.first_n is not None and self.first_n < 0:
            raise ValueError(f"`first_n` (the number of blocks to checkpoint) must be at least 0, got {self.first_n}.")
        if self.policy == "selective" and not self.module_classes:
            raise ValueError("`policy='selective'` needs `module_classes`, e.g. ['LlamaMLP'].")

    @property
    def left_to_the_planner(self) -> bool:
        """Whether the planner's plan decides the policy (`auto`), or the count of `first_n`'s blocks (None)."""
        return self.policy == "auto" or self.policy == "first_n" and self.first_n is None

    def apply(self, model: nn.Module) -> int:
        """Wraps the chosen blocks of `model` that do not recompute themselves already; returns how many."""
        if self.policy in ("none", "auto"):
            return 0
        if self.policy == "selective":
            chosen = find_blocks(model, self.module_classes)
        else:
            blocks = find_blocks(model, self.module_classes)
            if self.policy == "first_n" and (self.first_n or 0) > len(blocks):
                raise ValueError(f"`first_n={self.first_n}` asks to checkpoint more blocks than {type(model).__name__} "
                                 f"has ({len(blocks)}). Pass at most {len(blocks)}, or `policy='full'`.")
            chosen = (blocks[:: self.every_k] if self.policy == "every_k" else
                      blocks[: self.first_n] if self.policy == "first_n" else blocks)
        chosen = [block for block in chosen if not is_checkpointed(block)]
        if self.policy != "offload":
            for block in chosen:
                _wrap_forward(block, _recompute, by_fit=True)
            return len(chosen)
        offloader = ActivationOffloader(min_bytes=self.offload_min_bytes)
        for index, block in enumerate(chosen):
            _wrap_forward(block, functools.partial(offloader.run, block, index), by_fit=True)
            setattr(block, _OFFLOADER, offloader)
        return len(chosen)


def as_checkpointing_config(value: str | dict[str, Any] | CheckpointingConfig | None) -> CheckpointingConfig:
    if value is None:
        return CheckpointingConfig(policy="auto")
    if isinstance(value, CheckpointingConfig):
        return value
    if isinstance(value, str):
        return CheckpointingConfig(policy=value)
    return CheckpointingConfig(**dict(value))
