"""`InBackwardAdamW8bit`: the fused 8-bit AdamW, each parameter updated inside backward as soon as its gradient is
final, its gradient freed at once, so no model-sized gradient buffer ever exists.

It is an `AdamW8bitFused` (so a real `torch.optim.Optimizer`: LR schedulers and Lightning edit `param_groups`, and
each update reads its group's hyperparameters when it runs) with one bucket per parameter: a parameter's update
needs only its own gradient, so the math, the rounding bits and the state dict are those of `AdamW8bitFused`.
`step(closure)` runs the closure (forward and backward, where the updates happen), then updates every parameter
that still holds a gradient: those that got none in the last backward but some earlier in the accumulation, or
all of them while `updates_in_backward` is off (gradient clipping by norm needs every gradient first).
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_offload.kernels.adamw8bit import Bucket8bit, step_with_group
from lightning_offload.kernels.optimizer import AdamW8bitFused


class InBackwardAdamW8bit(AdamW8bitFused):
    """AdamW with 8-bit state, stepped per parameter by post-accumulate-grad hooks.

    Call `attach()` once to register the hooks. `updates_in_backward` (set before each backward) says whether this
    backward's final gradients are to be applied: False while gradients accumulate over micro-batches.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.updates_in_backward = False
        self._bucket_of: dict[torch.Tensor, tuple[dict[str, Any], Bucket8bit]] = {}
        self._hooks: list[Any] = []

    def attach(self) -> None:
        self.detach()
        self._hooks = [param.register_post_accumulate_grad_hook(self._on_gradient_ready)
                       for group in self.param_groups for param in group["params"] if param.requires_grad]

    def detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def allocate_state(self) -> None:
        """Allocates every parameter's 8-bit state now rather than at its first update (so free memory is known)."""
        self._get_buckets()

    def _on_gradient_ready(self, param: torch.Tensor) -> None:
        if self.updates_in_backward:
            self._update(param)

    @torch.no_grad()
    def _update(self, param: torch.Tensor) -> None:
        self._get_buckets()
        group, bucket = self._bucket_of[param]
        step_with_group(bucket, [param.grad], group)
        param.grad = None

    def _update_with_gradients(self) -> None:
        # What `step` applies after its closure: the gradients no hook applied (see the module's docstring).
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._get_buckets()  # back on the parameters' device now, not inside the next backward

    def _get_buckets(self) -> list[tuple[dict[str, Any], Bucket8bit]]:
        if self._buckets is None:
            self._buckets, self._bucket_of = [], {}
            key = 0  # the param's index over all groups, as in `AdamW8bitFused`: the same rounding bits
            for group in self.param_groups:
                for param in group["params"]:
                    bucket = Bucket8bit.create([param], keys=[key])
                    self._adopt_state(bucket)
                    self._buckets.append((group, bucket))
                    self._bucket_of[param] = (group, bucket)
                    key += 1
        return self._buckets
