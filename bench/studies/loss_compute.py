"""The output layer and its loss alone, forward and backward, at a benchmark size's shapes: transformers' way (full
fp32 logits, `F.cross_entropy`) against `lightning_offload.losses.linear_cross_entropy` (chunked), with the time
and the peak GPU memory of each.

    python -m bench.studies.loss_compute --sizes 19b,32.8b
"""

from __future__ import annotations

import argparse
import json


import torch
import torch.nn.functional as F

from bench import GIB, RESULT_PREFIX
from bench.models import SIZES
from bench.probe import _seconds
from lightning_offload.losses import linear_cross_entropy

MICRO_BATCH, SEQ = 4, 2048


def full_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), targets)


def measure(loss_fn, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    def step() -> None:
        loss_fn(hidden, weight, targets).backward()
        hidden.grad = weight.grad = None

    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    seconds = _seconds(step, 5, True)
    return {"ms": round(seconds * 1e3, 1), "peak_GiB": round((torch.cuda.max_memory_allocated() - base) / GIB, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="19b,32.8b")
    args = parser.parse_args()
    for size in args.sizes.split(","):
        shape = SIZES[size]
        tokens = MICRO_BATCH * (SEQ - 1)
        hidden = torch.randn(tokens, shape.hidden, dtype=torch.bfloat16, device="cuda", requires_grad=True)
        weight = (torch.randn(shape.vocab, shape.hidden, dtype=torch.bfloat16, device="cuda") * 0.02).requires_grad_()
        targets = torch.randint(0, shape.vocab, (tokens,), device="cuda")
        flops = 3 * 2 * tokens * shape.hidden * shape.vocab
        row: dict[str, object] = {"size": size, "head_matmuls_TFLOP": round(flops / 1e12, 1),
                                  "full": measure(full_loss, hidden, weight, targets)}
        for chunk_mib in (256, 1024):
            row[f"chunked_{chunk_mib}MiB"] = measure(
                lambda h, w, t, c=chunk_mib: linear_cross_entropy(h, w, t, chunk_bytes=c * 2**20), hidden, weight,
                targets)
        print(RESULT_PREFIX + json.dumps(row), flush=True)
        del hidden, weight, targets
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
