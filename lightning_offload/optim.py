"""Turning the optimizer a user wrote in `configure_optimizers` into the one an engine can step.

The user's hyperparameters and param groups are carried over unchanged; only the implementation moves to where the
optimizer state lives.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.optim import Optimizer

# Flags of torch's Adam/AdamW that select an implementation, not a hyperparameter: dropped when the class changes.
_TORCH_ADAM_IMPLEMENTATION_FLAGS = frozenset(
    {"amsgrad", "foreach", "maximize", "capturable", "differentiable", "fused", "decoupled_weight_decay"}
)


def _is_adamw(optimizer: Optimizer) -> bool:
    return isinstance(optimizer, torch.optim.AdamW) or bool(optimizer.defaults.get("decoupled_weight_decay"))


def to_cpu_adam(optimizer: Optimizer) -> Optimizer:
    """The same Adam/AdamW, run by DeepSpeed's CPU Adam on host-resident fp32 master weights.

    torch's Adam on the host is several times slower than DeepSpeed's vectorised CPU Adam, and DeepSpeed's
    offload refuses other Adam implementations by default; other optimizers pass through unchanged.
    """
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return optimizer
    for flag in ("amsgrad", "maximize"):
        if any(group.get(flag) for group in optimizer.param_groups):
            raise ValueError(
                f"`{type(optimizer).__name__}({flag}=True)` has no counterpart in DeepSpeed's CPU Adam, which runs "
                f"the optimizer of the `deepspeed` backend. Drop `{flag}=True`, or use an optimizer without it "
                "(SGD and other torch optimizers run unchanged on the offloaded parameters)."
            )
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    groups = [{k: v for k, v in g.items() if k not in _TORCH_ADAM_IMPLEMENTATION_FLAGS} for g in optimizer.param_groups]
    defaults = optimizer.defaults
    return DeepSpeedCPUAdam(
        groups,
        lr=float(defaults["lr"]),
        betas=defaults["betas"],
        eps=defaults["eps"],
        weight_decay=defaults["weight_decay"],
        adamw_mode=_is_adamw(optimizer),
    )


def rebind_lr_schedulers(schedulers: list[Any], old: Optimizer, new: Optimizer) -> None:
    """Points the user's LR schedulers at the optimizer that replaced the one they were built on."""
    if new is old:
        return
    for scheduler in schedulers:
        if getattr(scheduler, "optimizer", None) is old:
            scheduler.optimizer = new
    _mark_step_tracked(new)


def _mark_step_tracked(optimizer: Optimizer) -> None:
    # torch's LRScheduler wraps `optimizer.step` at construction to warn when the scheduler steps first; the
    # replacement optimizer never went through that constructor, so it gets the same wrapper here.
    step = optimizer.step
    if hasattr(step, "_wrapped_by_lr_sched"):
        return

    @functools.wraps(step)
    def tracked_step(*args: Any, **kwargs: Any) -> Any:
        optimizer._opt_called = True  # type: ignore[attr-defined]
        return step(*args, **kwargs)

    tracked_step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = tracked_step  # type: ignore[method-assign]
