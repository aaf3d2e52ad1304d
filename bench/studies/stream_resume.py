"""Resume exactness of the `stream` backend at a benchmark size: 4 steps in one run against 2 steps, a checkpoint
and 2 resumed steps.

    CUBLAS_WORKSPACE_CONFIG=:4096:8 python -m bench.studies.stream_resume --size 1.5b [--resident-blocks 8] \
        [--micro-batch 2 --seq 512 --lr 1e-4]

Two epochs of 2 steps each, the same batches in both runs (a plain DataLoader resumes only at an epoch boundary,
so the checkpoint is the one `ModelCheckpoint(every_n_train_steps=2)` writes after the first epoch's last step).
Half the blocks (and the embedding, final norm and output layer) are streamed from pinned host memory, the rest
resident. With deterministic kernels the resumed run repeats the uninterrupted one bit for bit: steps 3-4's losses,
every final weight (resident on the GPU and streamed in host memory) and every unit's 8-bit AdamW records and step
counters (the stochastic-rounding bits hash the step) must be equal, with no tolerance.

Prints one line: `RESULT {...}` with both runs' losses, whether each comparison is exact (with the largest
difference where not), the checkpoint's size on disk and the free space beside it, and seconds per phase. Exits 1
when anything differs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

import lightning_offload
from bench.models import SIZES
from bench.runners import LlamaModule
from lightning_offload.data import stdlib_bytes

STEPS_PER_EPOCH = 2


class _Module(LlamaModule):
    """The benchmark's Llama with its learning rate and a record of each step's loss."""

    def __init__(self, size: str, lr: float) -> None:
        super().__init__(size, "by_strategy", "adamw")
        self.lr = lr
        self.losses: list[float] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def _fit(args: argparse.Namespace, tokens: torch.Tensor, ckpt_path: str | None = None,
         **trainer_kwargs: Any) -> tuple[_Module, L.Trainer]:
    # Every block recomputed by the strategy's policy, so neither run's free GPU memory changes what is recomputed.
    strategy = lightning_offload.SingleGPUOffloadStrategy(
        backend="stream", resident_blocks=args.resident_blocks, stream_outer=True, activation_checkpointing="full",
        check_memory=False)
    trainer = L.Trainer(accelerator=args.accelerator, devices=1, strategy=strategy, precision=args.precision,
                        max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        **trainer_kwargs)
    module = _Module(args.size, args.lr)
    torch.manual_seed(0)
    trainer.fit(module, DataLoader(tokens, batch_size=args.micro_batch, shuffle=False), ckpt_path=ckpt_path)
    return module, trainer


def _largest_difference(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[int, float]:
    """How many tensor pairs differ, and by how much at most (compared as fp32)."""
    differing, largest = 0, 0.0
    for a, b in pairs:
        if a.shape != b.shape or a.device != b.device:
            return len(pairs), float("inf")
        if not torch.equal(a, b):
            differing += 1
            largest = max(largest, (a.float() - b.float()).abs().max().item())
    return differing, largest


def _compare(uninterrupted: _Module, resumed: _Module, first: L.Trainer, second: L.Trainer) -> dict[str, Any]:
    params = list(zip(resumed.parameters(), uninterrupted.parameters(), strict=True))
    weights_differing, weights_diff = _largest_difference(params)
    units = list(zip(second.strategy.backend.units, first.strategy.backend.units, strict=True))
    # The 8-bit records are bytes: any difference is a different state, so only whether they are equal counts.
    state_differing = sum(1 for a, b in units if a.host_state is not None and not torch.equal(a.host_state,
                                                                                               b.host_state))
    steps = [([e.bucket.steps for e in a.buckets], [e.bucket.steps for e in b.buckets]) for a, b in units]
    expected = uninterrupted.losses[STEPS_PER_EPOCH:]
    return {
        "losses_exact": resumed.losses == expected,
        "losses_max_abs_diff": max((abs(a - b) for a, b in zip(resumed.losses, expected)), default=float("inf")),
        "weights_exact": weights_differing == 0, "weights_differing": f"{weights_differing}/{len(params)}",
        "weights_max_abs_diff": weights_diff,
        "streamed_tensors": sum(len(a.params) for a, _ in units if a.streamed),
        "state_exact": state_differing == 0, "state_units_differing": f"{state_differing}/{len(units)}",
        "steps_exact": all(a == b for a, b in steps),
        "steps_seen": sorted({s for a, _ in steps for group in a for s in group}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1.5b", choices=sorted(SIZES))
    parser.add_argument("--resident-blocks", type=int, default=None, help="default: half the blocks")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-4, help="large enough that each step moves bf16 weights")
    parser.add_argument("--accelerator", default="gpu", help="'cpu' runs the same comparison without a GPU")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the checkpoints go (two of the model's weights + 8-bit state, ~12 GB at 1.5B; "
                             "default: a temporary folder, removed afterwards)")
    args = parser.parse_args()
    if args.resident_blocks is None:
        args.resident_blocks = SIZES[args.size].layers // 2
    # Two identical CUDA runs differ through atomic-add backward kernels (SDPA, embedding) unless these are set
    # before the first cuBLAS call.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    directory = Path(tempfile.mkdtemp(prefix="stream_resume_")) if args.dir is None else args.dir
    # Text: steps 3-4 repeat steps 1-2's batches, and a falling loss on them shows the weights moved.
    sequences = STEPS_PER_EPOCH * args.micro_batch
    tokens = stdlib_bytes(sequences * args.seq).long().view(sequences, args.seq)
    seconds: dict[str, float] = {}
    try:
        started = time.perf_counter()
        callback = ModelCheckpoint(dirpath=directory, every_n_train_steps=STEPS_PER_EPOCH, save_top_k=-1)
        uninterrupted, first = _fit(args, tokens, enable_checkpointing=True, callbacks=[callback])
        seconds["uninterrupted_fit"] = time.perf_counter() - started
        checkpoint = directory / f"epoch=0-step={STEPS_PER_EPOCH}.ckpt"
        checkpoint_gib = int(subprocess.run(["du", "-sb", str(checkpoint)], capture_output=True, text=True,
                                            check=True).stdout.split()[0]) / 2**30
        started = time.perf_counter()
        resumed, second = _fit(args, tokens, enable_checkpointing=False, ckpt_path=str(checkpoint))
        seconds["resumed_fit"] = time.perf_counter() - started
        started = time.perf_counter()
        result = _compare(uninterrupted, resumed, first, second)
        seconds["compare"] = time.perf_counter() - started
        free_gib = shutil.disk_usage(directory).free / 2**30
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    backend = second.strategy.backend
    blocks = sum(1 for u in backend.units if u.is_block)
    streamed_blocks = sum(1 for i in backend.placement.streamed if backend.units[i].is_block)
    print("RESULT " + json.dumps({
        "size": args.size, "resident_blocks": f"{blocks - streamed_blocks}/{blocks}",
        "streamed_units": len(backend.placement.streamed), "pinned": all(a.pinned for a in backend._arenas),
        **result, "uninterrupted_losses": uninterrupted.losses, "resumed_losses": resumed.losses,
        "checkpoint_GiB": round(checkpoint_gib, 2), "disk_free_GiB_after_both": round(free_gib, 1),
        "seconds": {k: round(v, 1) for k, v in seconds.items()}}))
    exact = result["losses_exact"] and result["weights_exact"] and result["state_exact"] and result["steps_exact"]
    sys.exit(0 if exact else 1)


if __name__ == "__main__":
    main()
