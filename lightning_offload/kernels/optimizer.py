"""`AdamW8bitFused`: the fused 8-bit AdamW as a `torch.optim.Optimizer`.

It subclasses `Optimizer` (not a wrapper object) because LR schedulers and Lightning check the type and edit
`param_groups` in place; every group option (lr, betas, eps, weight_decay, stochastic_rounding, seed) is read
again at each step. Parameters are bucketed per (param group, device, dtype), and each bucket is stepped by one
`fused_adamw8bit_step`: one Triton launch on CUDA, the torch reference elsewhere.

State: `self.state[p]` is `{"step": tensor, "state": uint8 [blocks, 528]}`, the param's records viewed in its
bucket's buffer (format in `adamw8bit`; `reference.dequantize` decodes them). `state_dict` carries these views
as they are (one uint8 storage a bucket: no copy, and `torch.save` writes each bucket once); `load_state_dict`
copies them back into the buckets.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

from lightning_offload.kernels.adamw8bit import Bucket8bit, step_with_group


class AdamW8bitFused(Optimizer):
    """AdamW (decoupled weight decay) with 8-bit state; bf16 weights are written with stochastic rounding.

    `stochastic_rounding=False` rounds bf16 weights to nearest instead; `seed` picks the rounding bits (a resumed
    run with the same seed draws the same ones). fp32 parameters are accepted and stored exactly.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2, *,
                 stochastic_rounding: bool = True, seed: int = 0) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"Invalid AdamW hyperparameters: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}.")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        stochastic_rounding=stochastic_rounding, seed=seed)
        super().__init__(params, defaults)
        self._buckets: list[tuple[dict[str, Any], Bucket8bit]] | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._sync_steps()
        self._buckets = None  # rebuilt at the next step; the state of the existing params is carried over

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._update_with_gradients()
        return loss

    def _update_with_gradients(self) -> None:
        """Updates every parameter that holds a gradient, one launch a bucket."""
        for group, bucket in self._get_buckets():
            grads = [p.grad for p in bucket.params]
            if all(grad is None for grad in grads):
                continue
            step_with_group(bucket, grads, group)

    def _get_buckets(self) -> list[tuple[dict[str, Any], Bucket8bit]]:
        if self._buckets is None:
            self._buckets = []
            key = 0  # a param's index over all groups: the identity its rounding bits are drawn from
            for group in self.param_groups:
                by_kind: dict[tuple[torch.device, torch.dtype], list[tuple[int, torch.Tensor]]] = defaultdict(list)
                for param in group["params"]:
                    by_kind[(param.device, param.dtype)].append((key, param))
                    key += 1
                for members in by_kind.values():
                    bucket = Bucket8bit.create([p for _, p in members], keys=[k for k, _ in members])
                    self._adopt_state(bucket)
                    self._buckets.append((group, bucket))
        return self._buckets

    def _adopt_state(self, bucket: Bucket8bit) -> None:
        """Copies state the params already have (loaded, or from a previous bucketing) into `bucket`'s buffer."""
        for index, param in enumerate(bucket.params):
            records = bucket.tensor_state(index)
            previous = self.state.get(param, {})
            if previous:
                if "state" not in previous or previous["state"].shape != records.shape:
                    raise ValueError(
                        f"A parameter's state has keys {sorted(previous)}, not the `step` and `state` of "
                        f"`AdamW8bitFused` for a {tuple(param.shape)} tensor: load a state dict saved by "
                        "`AdamW8bitFused` for the same parameters.")
                records.copy_(previous["state"])
                bucket.steps[index] = int(previous["step"])
            self.state[param] = {"step": torch.tensor(float(bucket.steps[index])), "state": records}

    def _sync_steps(self) -> None:
        for _, bucket in getattr(self, "_buckets", None) or []:
            for param, step in zip(bucket.params, bucket.steps):
                self.state[param]["step"] = torch.tensor(float(step))

    def state_dict(self) -> dict[str, Any]:
        self._sync_steps()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch's loading would cast the uint8 records to the param's dtype: keep them out of it, and snapshot them
        # (they may be views of a live optimizer's buffer) until the next step copies them into the buckets.
        super().load_state_dict({**state_dict, "state": {}})
        params = [p for group in self.param_groups for p in group["params"]]
        for index, entry in state_dict["state"].items():
            self.state[params[index]] = {name: value.clone() if torch.is_tensor(value) else value
                                         for name, value in entry.items()}
        self._buckets = None
