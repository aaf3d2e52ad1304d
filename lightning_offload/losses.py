"""Cross-entropy of a language model's output layer without its full logits.

For 8192 tokens and a 128K vocabulary the logits are 4.2 GB in fp32, and `F.cross_entropy` keeps as much again for
backward (its log-softmax) plus the gradient of the logits: more than a block's activations. Here the output
layer and the loss are one autograd function: the forward computes the logits a slice of tokens at a time and keeps
only each token's log-sum-exp (4 bytes a token); the backward recomputes them a slice of the vocabulary at a time,
so the head's weight gradient comes out of one matmul per slice (accumulated in the matmul, as without chunking)
and the hidden states' gradient is summed in fp32 over slices.

Why our own: torch has no fused linear + cross-entropy; Liger-Kernel and cut-cross-entropy have one but are CUDA /
Triton only and outside this project's stack. This one is plain torch (CPU and GPU), at the price of recomputing
the head's matmul once (~1/3 more of the head's FLOPs).

The loss must be computed inside a module's forward so engines that gather weights on module hooks (DeepSpeed
ZeRO-3, FSDP2) see the head's weight: `ChunkedLMHeadLoss` is an `nn.Linear` whose `forward(hidden, targets)`
returns the mean loss (and `forward(hidden)` the logits, as a Linear does).
"""

from __future__ import annotations

from contextlib import nullcontext

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# fp32 logits computed at once, in forward (a slice of tokens) and backward (a slice of the vocabulary).
DEFAULT_CHUNK_BYTES = 256 * 2**20
IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, ignore_index: int, chunk_bytes: int) -> torch.Tensor:
        tokens, vocab = hidden.shape[0], weight.shape[0]
        rows = max(1, chunk_bytes // (4 * vocab))
        log_normalizer = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
        target_logit = torch.empty_like(log_normalizer)
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)
        for start in range(0, tokens, rows):
            part = slice(start, start + rows)
            logits = F.linear(hidden[part], weight, bias).float()
            log_normalizer[part] = torch.logsumexp(logits, dim=-1)
            target_logit[part] = logits.gather(1, safe_targets[part, None])[:, 0]
        count = valid.sum()
        ctx.save_for_backward(hidden, weight, bias, safe_targets, valid, log_normalizer, count)
        ctx.chunk_bytes = chunk_bytes
        # Mean over the targets that are not ignored: NaN when all are, as with `F.cross_entropy`.
        return torch.where(valid, log_normalizer - target_logit, 0.0).sum() / count

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, targets, valid, log_normalizer, count = ctx.saved_tensors
        tokens, vocab = hidden.shape[0], weight.shape[0]
        columns = max(1, ctx.chunk_bytes // (4 * tokens))
        # d loss / d logits = (softmax - one_hot(target)) * grad_loss / count on every token not ignored.
        token_scale = (valid * (grad_loss / count)).float()[:, None]
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
        grad_weight = torch.empty_like(weight) if need_weight else None
        grad_bias = torch.empty_like(bias) if need_bias else None
        token_index = torch.arange(tokens, device=hidden.device)
        for start in range(0, vocab, columns):
            part = slice(start, start + columns)
            logits = F.linear(hidden, weight[part], None if bias is None else bias[part]).float()
            grad_logits = torch.exp_(logits.sub_(log_normalizer[:, None]))
            in_part = (targets >= start) & (targets < start + columns)
            grad_logits[token_index[in_part], targets[in_part] - start] -= 1.0
            grad_logits.mul_(token_scale)
            if need_bias:
                grad_bias[part] = grad_logits.sum(0)
            grad_logits = grad_logits.to(hidden.dtype)  # the dtype autograd would hand the head's matmul
            if need_hidden:
                grad_hidden += (grad_logits @ weight[part]).float()
            if need_weight:
                grad_weight[part] = grad_logits.t() @ hidden
        return (None if grad_hidden is None else grad_hidden.to(hidden.dtype)), grad_weight, grad_bias, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, *, ignore_index: int = IGNORE_INDEX,
                         chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """`F.cross_entropy(F.linear(hidden, weight, bias).float(), targets)` (mean), without the full logits.

    `hidden` is [..., features] and `targets` [...]; under autocast the matmuls run in the autocast dtype, as
    `F.linear` would.
    """
    device_type = hidden.device.type
    # The meta device (the memory planner's measurement) has no autocast state to honour.
    autocasting = device_type != "meta" and torch.is_autocast_enabled(device_type)
    if autocasting:
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    with torch.autocast(device_type, enabled=False) if device_type != "meta" else nullcontext():
        return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1),
                                         ignore_index, chunk_bytes)


class ChunkedLMHeadLoss(nn.Linear):
    """A language model's output layer that also computes its loss: `forward(hidden)` gives the logits,
    `forward(hidden, targets)` the mean cross-entropy without materialising them (see `linear_cross_entropy`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 ignore_index: int = IGNORE_INDEX, chunk_bytes: int = DEFAULT_CHUNK_BYTES, **factory: Any) -> None:
        super().__init__(in_features, out_features, bias=bias, **factory)
        self.ignore_index, self.chunk_bytes = ignore_index, chunk_bytes

    @classmethod
    def adopt(cls, linear: nn.Linear, *, ignore_index: int = IGNORE_INDEX,
              chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> ChunkedLMHeadLoss:
        """Turns `linear` itself into a `ChunkedLMHeadLoss`: its weight stays the very Parameter it was (tied,
        partitioned by an engine, named as before), which building a new module would not keep."""
        linear.__class__ = cls
        linear.ignore_index, linear.chunk_bytes = ignore_index, chunk_bytes
        return linear  # type: ignore[return-value]

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(hidden)
        return linear_cross_entropy(hidden, self.weight, targets, self.bias, ignore_index=self.ignore_index,
                                    chunk_bytes=self.chunk_bytes)
