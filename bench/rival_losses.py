"""The output-layer losses that rival `lightning_offload.losses`: torchtune's `LinearCrossEntropyLoss` (reimplemented
here step for step: `import torchtune` loads its datasets, tokenizers and pinned torchdata, which would not fit the
GPU machine's carried wheels) and Liger-Kernel's fused linear cross-entropy (imported: `pip install liger-kernel`,
CUDA only). Both run inside a module's forward, as ours does, so engines that gather weights on module hooks see the
head's weight.

    python -m bench.rival_losses --sizes 8b,14.8b    # the output layer and loss alone, each way: time and GPU peak
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_offload.losses import IGNORE_INDEX, ChunkedLMHeadLoss

# torchtune's default: the sequence is split into this many chunks, each projected and reduced on its own.
TORCHTUNE_OUTPUT_CHUNKS = 8


class TorchtuneLinearCrossEntropy(nn.Module):
    """torchtune.modules.loss.LinearCrossEntropyLoss, step for step: the sequence in 8 chunks; per chunk the ignored
    tokens are masked out before the projection, the logits computed in the head's dtype and reduced in fp32 by
    `F.cross_entropy(..., reduction="sum")`; the sum over chunks divided by the tokens not ignored. With
    `apply_compile_strategy()` (the recipe's `compile: True`) only the per-chunk function is compiled, as torchtune
    does: compiling the chunking too would keep every chunk's logits alive at once."""

    def __init__(self, head: Callable[[torch.Tensor], torch.Tensor], num_output_chunks: int = TORCHTUNE_OUTPUT_CHUNKS,
                 ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.head, self.num_output_chunks, self.ignore_index = head, num_output_chunks, ignore_index
        self.compiled = False

    def apply_compile_strategy(self) -> TorchtuneLinearCrossEntropy:
        self.compute_cross_entropy = torch.compile(self.compute_cross_entropy)
        self.compiled = True
        return self

    def compute_cross_entropy(self, hidden_chunk: torch.Tensor, target_chunk: torch.Tensor) -> torch.Tensor:
        mask_chunk = target_chunk != self.ignore_index
        logits = self.head(hidden_chunk[mask_chunk])
        return F.cross_entropy(logits.float(), target_chunk[mask_chunk], reduction="sum",
                               ignore_index=self.ignore_index)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total_elements = (targets != self.ignore_index).sum()
        hidden_chunks = hidden.tensor_split(self.num_output_chunks, dim=1)
        target_chunks = targets.tensor_split(self.num_output_chunks, dim=1)
        total_loss = sum(self.compute_cross_entropy(h, t) for h, t in zip(hidden_chunks, target_chunks))
        return total_loss / total_elements


def torchtune_labels(tokens: torch.Tensor) -> torch.Tensor:
    """torchtune's recipe shifts the labels and pads the last position with the ignore index (the hidden states
    keep the whole sequence)."""
    pad = torch.full_like(tokens[:, :1], IGNORE_INDEX)
    return torch.cat([tokens[:, 1:], pad], dim=1)


class LigerLMHeadLoss(ChunkedLMHeadLoss):
    """A language model's output layer whose `forward(hidden, targets)` is Liger-Kernel's fused linear
    cross-entropy (mean over the tokens not ignored); `forward(hidden)` gives the logits, as a Linear does.

    A `ChunkedLMHeadLoss` to our memory planner, so the row plans as our chunked-loss row does (Liger's own
    workspace, one slice of logits in the head's dtype, is smaller) and only the loss differs; on the meta device,
    where the planner measures the model, ours computes the shapes."""

    @classmethod
    def adopt(cls, linear: nn.Linear, **loss_options: Any) -> LigerLMHeadLoss:
        """Turns `linear` itself into a `LigerLMHeadLoss`, keeping its very Parameter (see `ChunkedLMHeadLoss.adopt`).
        Raises ImportError at once when liger-kernel is missing, so the cell is recorded as not available."""
        import liger_kernel.transformers.functional  # noqa: F401

        return super().adopt(linear, **loss_options)  # type: ignore[return-value]

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None or hidden.device.type == "meta":
            return super().forward(hidden, targets)
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        # Liger reads the autocast state itself (its matmuls follow AMP's casts).
        return liger_fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.weight,
                                                targets.reshape(-1), self.bias, ignore_index=self.ignore_index)


def main() -> None:
    from bench import RESULT_PREFIX
    from bench.studies.loss_compute import MICRO_BATCH, SEQ, full_loss, measure
    from bench.models import SIZES
    from lightning_offload.losses import linear_cross_entropy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8b,14.8b")
    args = parser.parse_args()
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    for size in args.sizes.split(","):
        shape = SIZES[size]
        tokens = MICRO_BATCH * (SEQ - 1)
        hidden = torch.randn(tokens, shape.hidden, dtype=torch.bfloat16, device="cuda", requires_grad=True)
        head = nn.Linear(shape.hidden, shape.vocab, bias=False, device="cuda", dtype=torch.bfloat16)
        nn.init.normal_(head.weight, std=0.02)
        targets = torch.randint(0, shape.vocab, (tokens,), device="cuda")
        eager, compiled = TorchtuneLinearCrossEntropy(head), TorchtuneLinearCrossEntropy(head).apply_compile_strategy()
        # torchtune's loss takes [batch, seq, features]: one sequence of the same tokens, in 8 chunks as the recipe's.
        ways = {"full": full_loss, "ours_chunked": linear_cross_entropy,
                "liger_fused": lambda h, w, t: liger_fused_linear_cross_entropy(h, w, t),
                "torchtune_linear": lambda h, w, t: eager(h[None], t[None]),
                "torchtune_linear_compiled": lambda h, w, t: compiled(h[None], t[None])}
        row: dict[str, object] = {"size": size}
        for name, loss_fn in ways.items():
            try:
                row[name] = measure(loss_fn, hidden, head.weight, targets)
            except Exception as error:  # one way failing (an OOM of the full logits) leaves the others' figures
                row[name] = f"{type(error).__name__}: {str(error)[:200]}"
            torch.cuda.empty_cache()
        print(RESULT_PREFIX + json.dumps(row), flush=True)
        del hidden, head, targets, eager, compiled
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
