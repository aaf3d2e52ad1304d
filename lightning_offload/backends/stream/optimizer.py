"""The optimizer Lightning sees: the user's AdamW param groups, stepped block by block inside backward.

`StreamAdamW` subclasses `Optimizer` (not a wrapper object) because LR schedulers and Lightning check the type
and edit `param_groups` in place; each unit's update reads lr, betas, eps and weight_decay from them when it runs,
so a scheduler's change applies to the next step like with any optimizer. `step(closure)` only runs the closure:
the update already happened inside the backward it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_offload.kernels.adamw8bit import Bucket8bit, step_with_group
from lightning_offload.optim import decouples_weight_decay, is_adam


class StreamAdamW(Optimizer):
    def __init__(self, param_groups: list[dict[str, Any]], *, lr: float, stochastic_rounding: bool = True,
                 seed: int = 0) -> None:
        defaults = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                        stochastic_rounding=stochastic_rounding, seed=seed)
        super().__init__(param_groups, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


def as_stream_adamw(optimizer: Optimizer, *, stochastic_rounding: bool, seed: int) -> StreamAdamW:
    """The same param groups and hyperparameters; refuses what 8-bit AdamW cannot run exactly."""
    decoupled = decouples_weight_decay(optimizer) or type(optimizer).__name__ == "AdamW8bitFused"
    coupled_decay = is_adam(optimizer) and not decoupled and any(
        g.get("weight_decay", 0) for g in optimizer.param_groups)
    if not (decoupled or is_adam(optimizer)) or coupled_decay:
        raise ValueError(
            f"The `stream` backend updates with 8-bit AdamW, but `configure_optimizers` returned "
            f"`{type(optimizer).__name__}`{' with weight_decay (L2, not decoupled)' if coupled_decay else ''}. "
            "Return `torch.optim.AdamW` (or Adam without weight decay), or pick another backend for this optimizer."
        )
    if any(g.get("amsgrad") or g.get("maximize") for g in optimizer.param_groups):
        raise ValueError("The `stream` backend's 8-bit AdamW has no `amsgrad` or `maximize`: drop them.")
    keep = ("params", "lr", "betas", "eps", "weight_decay", "initial_lr")
    groups = [{k: v for k, v in group.items() if k in keep} for group in optimizer.param_groups]
    return StreamAdamW(groups, lr=float(optimizer.defaults.get("lr", 1e-3)),
                       stochastic_rounding=stochastic_rounding, seed=seed)


@dataclass(eq=False)
class GroupBucket:
    """A unit's parameters of one param group and their 8-bit state (`bucket.state` points into a slot when
    the update runs)."""

    group: int
    params: list[nn.Parameter]
    bucket: Bucket8bit


def build_buckets(params: list[nn.Parameter], optimizer: StreamAdamW) -> list[GroupBucket]:
    """One bucket per param group present among `params`; a parameter's rounding key is its index over all
    groups, as in `AdamW8bitFused`."""
    where = {id(p): (g, key) for g, key, p in _indexed(optimizer)}
    by_group: dict[int, list[tuple[int, nn.Parameter]]] = {}
    for param in params:
        if id(param) in where:
            group, key = where[id(param)]
            by_group.setdefault(group, []).append((key, param))
    buckets = []
    for group, members in sorted(by_group.items()):
        shapes = [torch.empty(p.shape, dtype=p.dtype, device="meta") for _, p in members]
        bucket = Bucket8bit.create(shapes, device="meta", keys=[key for key, _ in members])
        buckets.append(GroupBucket(group, [p for _, p in members], bucket))
    return buckets


def _indexed(optimizer: Optimizer) -> list[tuple[int, int, nn.Parameter]]:
    out, key = [], 0
    for g, group in enumerate(optimizer.param_groups):
        for param in group["params"]:
            out.append((g, key, param))
            key += 1
    return out


def update_buckets(buckets: list[GroupBucket], states: list[torch.Tensor], optimizer: StreamAdamW) -> None:
    """One fused 8-bit AdamW launch per bucket, on the parameters where they are now, with state in `states`."""
    for entry, state in zip(buckets, states):
        group = optimizer.param_groups[entry.group]
        # `.data`: the in-place write must not bump the parameter's version (autograd may still hold it).
        entry.bucket.params = [p.data for p in entry.params]
        entry.bucket.state = state
        step_with_group(entry.bucket, [p.grad for p in entry.params], group)
