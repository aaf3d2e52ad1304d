"""Fused AdamW with 8-bit blockwise state and stochastic rounding of bf16 weights: the bucket and its step.

Functional API (what the plans call on their own buckets)::

    bucket = Bucket8bit.create(params, device=None, keys=None)   # zeroed state, one byte buffer
    fused_adamw8bit_step(bucket, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                         seed=0, stochastic_rounding=True)        # one launch for the whole bucket

`grads` is a list aligned with `bucket.params`; a `None` entry skips that tensor (its state and step count stay).
Parameters are bf16 or fp32, contiguous, all of one dtype and on one device; gradients are bf16 or fp32, all of
one dtype. On CUDA the step is one Triton launch (`_triton_adamw8bit`); elsewhere it runs the pure-torch
reference (`reference.py`), which computes the same function and is the kernel's test oracle.

The state's layout and codes, and the rounding of the weights: `kernels/format.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_offload.kernels.format import (
    BLOCK_SIZE,
    RECORD_BYTES,
    Bucket8bit,
    StepScalars,
    TensorStep,
    round_to_fp32,
    rounding_key,
)
from lightning_offload.kernels.reference import reference_update

# Re-exported: the bucket and its format are part of this module's API.
__all__ = ["BLOCK_SIZE", "RECORD_BYTES", "Bucket8bit", "fused_adamw8bit_step", "step_with_group"]


def step_with_group(bucket: Bucket8bit, grads: Sequence[torch.Tensor | None], group: dict) -> None:
    """`fused_adamw8bit_step` with the hyperparameters of an optimizer's param group (read at every step, so an LR
    scheduler's change applies)."""
    fused_adamw8bit_step(bucket, grads, lr=float(group["lr"]), betas=group["betas"], eps=group["eps"],
                         weight_decay=group["weight_decay"], seed=group["seed"],
                         stochastic_rounding=group["stochastic_rounding"])


def fused_adamw8bit_step(bucket: Bucket8bit, grads: Sequence[torch.Tensor | None], *, lr: float,
                         betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                         seed: int = 0, stochastic_rounding: bool = True, backend: str = "auto") -> None:
    """One AdamW step over every tensor of `bucket` that has a gradient: updates params and state in place.

    `backend`: "auto" (Triton on CUDA, the reference elsewhere), "triton" or "reference".
    """
    if backend == "auto":
        backend = "triton" if bucket.params[0].is_cuda else "reference"
    if backend not in ("triton", "reference"):
        raise ValueError(f"`backend` must be 'auto', 'triton' or 'reference', not {backend!r}.")
    if len(grads) != len(bucket.params):
        raise ValueError(f"Got {len(grads)} gradients for a bucket of {len(bucket.params)} parameters.")
    if bucket.state.device != bucket.params[0].device:
        raise ValueError(f"The bucket's state is on {bucket.state.device} but its parameters are on "
                         f"{bucket.params[0].device}: copy `bucket.state` to the parameters' device first.")
    beta1, beta2 = float(betas[0]), float(betas[1])
    scalars = StepScalars(round_to_fp32(lr), round_to_fp32(eps), round_to_fp32(1.0 - lr * weight_decay))
    work = []
    for index, (param, grad) in enumerate(zip(bucket.params, grads)):
        if grad is None:
            continue
        if grad.is_sparse or grad.shape != param.shape:
            raise ValueError(f"Gradient {index} must be dense and shaped like its parameter {tuple(param.shape)}.")
        bucket.steps[index] += 1
        step = bucket.steps[index]
        work.append(TensorStep(index, grad.contiguous(), round_to_fp32((1.0 - beta1) / (1.0 - beta1**step)),
                               round_to_fp32((1.0 - beta2) / (1.0 - beta2**step)), rounding_key(seed, bucket.keys[index], step)))
    if not work:
        return
    if backend == "triton":
        from lightning_offload.kernels._triton_adamw8bit import triton_update

        triton_update(bucket, work, scalars, stochastic_rounding)
    else:
        reference_update(bucket, work, scalars, stochastic_rounding)
