"""Cross-entropy of a language model's output layer without its full logits.

For 8192 tokens and a 128K vocabulary the logits are 4.2 GB in fp32, and `F.cross_entropy` keeps as much again for
backward (its log-softmax) plus the gradient of the logits: more than a block's activations. Here the output
layer and the loss are one autograd function whose forward computes the logits a slice of tokens at a time and,
while a slice's logits exist, its gradients too (as Liger-Kernel's fused linear cross-entropy does): the hidden
states' gradient for those tokens and their share of the head's weight gradient, accumulated over slices (one
rounding per slice in the weight's dtype). Backward only scales them by its incoming gradient. The head's three
matmuls are those of the unchunked loss - nothing is recomputed - and what lives from forward to backward is one
weight-sized gradient instead of 2-3 copies of the fp32 logits.

Why our own: torch has no fused linear + cross-entropy; Liger-Kernel and cut-cross-entropy have one but are CUDA /
Triton only and outside this project's stack. This one is plain torch (CPU and GPU). Its price: the gradients are
computed even if backward never runs (only when grad mode is on and an input requires grad), and a graph cannot
run backward through it twice.

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

# fp32 logits computed at once (a slice of tokens): fewer, larger kernels are faster (bench/studies/loss_compute.py).
DEFAULT_CHUNK_BYTES = 2**30
IGNORE_INDEX = -100


def _slice_rows(vocab: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (4 * vocab))


def slice_workspace_bytes(tokens: int, vocab: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Peak bytes `linear_cross_entropy` allocates beyond its inputs and the gradients it keeps: one slice's fp32
    logits and `logsumexp`'s temporary of the same size. Forward only: backward allocates none of it."""
    return 2 * 4 * min(tokens, _slice_rows(vocab, chunk_bytes)) * vocab


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, ignore_index: int, chunk_bytes: int, needs: tuple[bool, bool, bool]
                ) -> torch.Tensor:
        tokens, vocab = hidden.shape[0], weight.shape[0]
        rows = _slice_rows(vocab, chunk_bytes)
        need_hidden, need_weight, need_bias = needs
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)
        count = valid.sum()
        # d loss / d logits = (softmax - one_hot(target)) / count on every token not ignored (NaN when all are, as
        # the loss is); backward scales by its incoming gradient.
        token_scale = valid.float() / count
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if need_bias else None
        for start in range(0, tokens, rows):
            part = slice(start, start + rows)
            logits = F.linear(hidden[part], weight, bias).float()
            log_normalizer = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, safe_targets[part, None])[:, 0]
            loss_sum += torch.where(valid[part], log_normalizer - target_logit, 0.0).sum()
            if need_hidden or need_weight or need_bias:
                grad_logits = logits.sub_(log_normalizer[:, None]).exp_()
                # A scatter, not a masked index: the host never waits for the GPU inside the loop.
                grad_logits.scatter_add_(1, safe_targets[part, None], -valid[part, None].float())
                grad_logits.mul_(token_scale[part, None])
                if need_bias:
                    grad_bias += grad_logits.sum(0)
                grad_logits = grad_logits.to(hidden.dtype)  # the dtype autograd would hand the head's matmuls
                if need_hidden:
                    torch.mm(grad_logits, weight, out=grad_hidden[part])
                if need_weight:
                    grad_weight.addmm_(grad_logits.t(), hidden[part])
                del grad_logits
            # Released before the next slice's logits exist, not when the names are rebound: this slice's fp32 logits
            # and bf16 gradient would otherwise stay alive beside the next slice's (3x `chunk_bytes`, not 2x).
            del logits
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.scaled, ctx.bias_dtype = False, None if bias is None else bias.dtype
        return loss_sum / count

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.scaled:
            raise RuntimeError("`linear_cross_entropy` computes its gradients in forward: backward runs once per "
                               "forward (`retain_graph=True` cannot run it again). Compute the loss again instead.")
        ctx.scaled = True
        # In place: a second copy of the head's weight gradient is the memory this function exists to avoid.
        grad_hidden, grad_weight, grad_bias = (None if g is None else g.mul_(grad_loss.to(g.dtype))
                                               for g in ctx.saved_tensors)
        grad_bias = None if grad_bias is None else grad_bias.to(ctx.bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


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
    grad = torch.is_grad_enabled()
    needs = (grad and hidden.requires_grad, grad and weight.requires_grad,
             grad and bias is not None and bias.requires_grad)
    with torch.autocast(device_type, enabled=False) if device_type != "meta" else nullcontext():
        return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1),
                                         ignore_index, chunk_bytes, needs)


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

    def workspace_bytes(self, tokens: int) -> int:
        """What computing the loss of `tokens` tokens allocates at its peak besides its gradients (the planner's)."""
        return slice_workspace_bytes(tokens, self.out_features, self.chunk_bytes)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(hidden)
        return linear_cross_entropy(hidden, self.weight, targets, self.bias, ignore_index=self.ignore_index,
                                    chunk_bytes=self.chunk_bytes)
