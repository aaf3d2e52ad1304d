"""One `stream` backend run of a benchmark size, with the per-phase timing of its last step.

    python -m bench.studies.stream_step --size 3.6b --steps 6 [--resident-blocks 14] [--micro-batch 4 --seq 2048]
        [--accumulate 8] [--nvme-path /mnt/nvme --host-gib 48]

Prints one line: seconds per step (median after the first 2), model TFLOP/s (6 x (params - input embedding) x
tokens / s), each step's time and loss, the busy seconds of the last step's host-to-device copies, device-to-host copies and updates (each
overlaps the compute; a phase close to the step time is the bound), resident blocks, peak GPU and host memory; with
`--nvme-path`, the blocks whose optimizer state is on disk, the bytes read and written per step and the seconds the
host waited for the disk in all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import lightning.pytorch as L
import torch
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader

import lightning_offload
from bench.models import SIZES
from bench.runners import LlamaModule, _RandomTokens
from lightning_offload.data import stdlib_bytes
from lightning_offload.telemetry import peak_host_rss_gib


class _Clock(L.Callback):
    """Times each optimizer step: from its first micro-batch's start to its last one's end."""

    def __init__(self, accumulate: int = 1) -> None:
        self.accumulate = accumulate
        self.times: list[float] = []
        self.losses: list[float] = []
        self.phases: dict[str, float] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx % self.accumulate == 0:
            torch.cuda.synchronize()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % self.accumulate:
            return
        self.phases = trainer.strategy.backend.phase_seconds()  # synchronises
        self.times.append(time.perf_counter() - self.start)
        self.losses.append(round(float(outputs["loss"]), 4))


def _attention_kernels(preference: str) -> contextlib.AbstractContextManager:
    if preference == "default":
        return contextlib.nullcontext()
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def _text_tokens(sequences: int, seq: int) -> torch.Tensor:
    return stdlib_bytes(sequences * seq).long().view(sequences, seq)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="3.6b")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--resident-blocks", type=int, default=None)
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--nvme-path", default=None, help="a folder for the optimizer state of the blocks that do "
                        "not fit in host memory (the disk tier)")
    parser.add_argument("--disk-blocks", type=int, default=None, help="blocks whose state is on disk (default: the "
                        "fewest that fit)")
    parser.add_argument("--host-gib", type=float, default=None,
                        help="host memory for the run (`max_host_memory_gib`), which the backend's own placement "
                             "keeps its pinned memory within too")
    parser.add_argument("--activation-reserve-gib", type=float, default=16.0)
    parser.add_argument("--data", choices=["random", "text"], default="random",
                        help="random tokens (throughput), or the standard library's source as byte tokens: a signal "
                             "a model learns in a few steps, to show the loss falling")
    parser.add_argument("--no-planner-check", action="store_true", help="skip the planner's pre-flight check")
    parser.add_argument("--compile-blocks", action="store_true", help="compile each decoder layer (torch.compile)")
    parser.add_argument("--sdpa", choices=["default", "cudnn"], default="default",
                        help="cudnn: prefer cuDNN's attention kernel over flash (SDPA falls back where it cannot run)")
    args = parser.parse_args()
    shape = SIZES[args.size]
    clock = _Clock(args.accumulate)
    budget = dict(max_host_memory_gib=args.host_gib) if args.host_gib is not None else {}
    disk = dict(nvme_path=args.nvme_path, disk_blocks=args.disk_blocks) if args.nvme_path else {}
    strategy = lightning_offload.SingleGPUOffloadStrategy(
        backend="stream", timing=True, resident_blocks=args.resident_blocks,
        activation_reserve_gib=args.activation_reserve_gib, check_memory=not args.no_planner_check,
        compile_blocks=args.compile_blocks, **budget, **disk)
    trainer = L.Trainer(accelerator="gpu", devices=1, strategy=strategy, precision="bf16-mixed", max_steps=args.steps,
                        accumulate_grad_batches=args.accumulate, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[clock])
    sequences = args.steps * args.accumulate * args.micro_batch
    tokens = _text_tokens(sequences, args.seq) if args.data == "text" \
        else _RandomTokens(sequences, args.seq, shape.vocab)
    started = time.perf_counter()
    with _attention_kernels(args.sdpa):
        trainer.fit(LlamaModule(args.size, "non_reentrant", "adamw"), DataLoader(tokens, batch_size=args.micro_batch))
    step = statistics.median(clock.times[2:] or clock.times)
    backend = trainer.strategy.backend
    blocks = sum(1 for u in backend.units if u.is_block)
    streamed_blocks = sum(1 for i in backend.placement.streamed if backend.units[i].is_block)
    print("RESULT " + json.dumps({
        "size": args.size, "compiled_blocks": args.compile_blocks, "sdpa": args.sdpa, "s_per_step": round(step, 3),
        "tokens_per_step": args.accumulate * args.micro_batch * args.seq,
        "tokens_per_s": round(args.accumulate * args.micro_batch * args.seq / step),
        "model_TFLOPs": round(6 * shape.matmul_params * args.accumulate * args.micro_batch * args.seq / step / 1e12,
                              1),
        "disk_blocks": len(backend.placement.on_disk), "disk_GiB": round(backend.placement.disk_bytes / 2**30, 1),
        "disk_GB_read_and_written_per_step": round(backend.placement.disk_bytes / 1e9, 1),
        "phases_s": {k: round(v, 3) for k, v in clock.phases.items()},
        "resident_blocks": f"{blocks - streamed_blocks}/{blocks}",
        "pinned_GiB": round(backend.placement.host_pinned_bytes / 2**30, 1),
        "peak_gpu_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 1),
        "peak_host_rss_GiB": round(peak_host_rss_gib(), 1), "wall_s": round(time.perf_counter() - started, 1),
        "compiled_graphs": counters["stats"]["unique_graphs"],
        "step_times": [round(t, 3) for t in clock.times], "losses": clock.losses}))


if __name__ == "__main__":
    main()
