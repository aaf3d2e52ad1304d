"""Turning the optimizer a user wrote in `configure_optimizers` into the one an engine can step.

The user's hyperparameters and param groups are carried over unchanged; only the implementation moves to where the
optimizer state lives.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_offload.backends.registry import NO_OFFLOAD

# Flags of torch's Adam/AdamW that select an implementation, not a hyperparameter: dropped when the class changes.
_TORCH_ADAM_IMPLEMENTATION_FLAGS = frozenset(
    {"amsgrad", "foreach", "maximize", "capturable", "differentiable", "fused", "decoupled_weight_decay"}
)


def is_adam(optimizer: Optimizer, *, exact: bool = False) -> bool:
    """Whether `optimizer` is torch's Adam or AdamW; `exact`: that class itself, not a subclass (whose `step` may
    compute something else)."""
    adams = (torch.optim.Adam, torch.optim.AdamW)
    return type(optimizer) in adams if exact else isinstance(optimizer, adams)


def decouples_weight_decay(optimizer: Optimizer) -> bool:
    """Whether `optimizer`'s weight decay is AdamW's (decoupled) rather than Adam's (L2 added to the gradient)."""
    return isinstance(optimizer, torch.optim.AdamW) or bool(optimizer.defaults.get("decoupled_weight_decay"))


def to_cpu_adam(optimizer: Optimizer) -> Optimizer:
    """The same Adam/AdamW, run by DeepSpeed's CPU Adam on host-resident fp32 master weights.

    torch's Adam on the host is several times slower than DeepSpeed's vectorised CPU Adam, and DeepSpeed's
    offload refuses other Adam implementations by default; other optimizers pass through unchanged.
    """
    if not is_adam(optimizer, exact=True):
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
        adamw_mode=decouples_weight_decay(optimizer),
    )


def rebind_lr_schedulers(schedulers: list[Any], old: Optimizer, new: Optimizer) -> None:
    """Points the user's LR schedulers at the optimizer that replaced the one they were built on."""
    if new is old:
        return
    if len(new.param_groups) == len(old.param_groups):
        # Schedulers keep their own keys in the groups at construction (`OneCycleLR`'s `max_lr`, `initial_lr`).
        for old_group, new_group in zip(old.param_groups, new.param_groups):
            for key, value in old_group.items():
                new_group.setdefault(key, value)
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


# Names accepted by `SingleGPUOffloadStrategy(optimizer=...)` and the `optimizer=` config group. `None` keeps the
# user's own optimizer from `configure_optimizers`.
OPTIMIZERS = ("adamw", "adamw8bit", "adamw8bit_fused", "paged_adamw8bit", "lion8bit", "cpu_adam")
_HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay", "initial_lr")


def check_optimizer_name(name: str | None) -> None:
    if name is not None and name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}. Choose one of {list(OPTIMIZERS)}, or None for your own.")


def check_optimizer_device(name: str | None, state_device: torch.device, training_device: torch.device) -> None:
    """Refuses an optimizer that cannot step where the engine keeps the optimizer state; warns about a slow one."""
    if name in ("adamw8bit", "adamw8bit_fused", "lion8bit") and state_device.type == "cpu" \
            and training_device.type == "cuda":
        warnings.warn(
            f"`optimizer={name!r}` steps the offloaded optimizer state on the CPU, where 8-bit updates are slow (with "
            "bitsandbytes, a 3.6B model on a 16-core host did not finish 5 steps in 300 s; with DeepSpeed's CPU Adam "
            f"a whole step took 3.2 s). For 8-bit state at GPU speed keep it on the GPU (`backend={NO_OFFLOAD!r}`); "
            "for offloaded state use `optimizer='cpu_adam'`.",
            stacklevel=2,
        )
    if name == "paged_adamw8bit" and state_device.type != "cuda":
        raise ValueError(
            "`optimizer='paged_adamw8bit'` pages its state between GPU and host memory, but here the optimizer state "
            f"lives on {state_device.type}. Use `optimizer='adamw8bit'` (the same 8-bit state, unpaged)."
        )
    if name == "cpu_adam" and state_device.type != "cpu":
        raise ValueError(
            "`optimizer='cpu_adam'` (DeepSpeed's CPU Adam) steps state in host memory, but here the optimizer state "
            "lives on the GPU. Use `optimizer='adamw'`, or offload the optimizer (`offload_optimizer=True`)."
        )


def replace_optimizer(optimizer: Optimizer, name: str) -> Optimizer:
    """An optimizer of another implementation with the user's param groups and hyperparameters.

    Hyperparameters the new optimizer does not have are dropped (SGD's momentum for AdamW); those the user's optimizer
    did not have take the new optimizer's defaults (AdamW's betas when replacing SGD).
    """
    groups = [
        {key: value for key, value in group.items() if key == "params" or key in _HYPERPARAMETERS}
        for group in optimizer.param_groups
    ]
    lr = optimizer.defaults.get("lr", 1e-3)
    if name == "adamw":
        fused = all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=lr, fused=fused or None)
    if name == "adamw8bit_fused":
        from lightning_offload.kernels import AdamW8bitFused

        return AdamW8bitFused(groups, lr=lr)
    if name == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, adamw_mode=True)
    import bitsandbytes as bnb

    implementations = {
        "adamw8bit": bnb.optim.AdamW8bit,
        "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
        "lion8bit": bnb.optim.Lion8bit,
    }
    if name == "lion8bit":
        groups = [{k: v for k, v in group.items() if k != "eps"} for group in groups]
    return implementations[name](groups, lr=lr)
