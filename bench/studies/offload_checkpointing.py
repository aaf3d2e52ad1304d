"""Forward + backward of a Llama block stack under each activation-checkpointing policy: seconds and peak GPU memory.

    python -m bench.studies.offload_checkpointing [--hidden 2048 --layers 16 --micro-batch 4 --seq 2048 --steps 3]

Rows: `none`, `full` (recompute), `offload` (lightning_offload: side-stream copies, prefetch, pooled host buffers)
and `offload (save_on_cpu)`, torch's `save_on_cpu(pin_memory=True)` around each block as `offload` was before:
synchronous copies on the compute stream. bf16 weights, no optimizer: the step is the stack's forward and backward
on random embeddings. Prints a table last; seconds are the median of `--steps` after 2 warm-up steps (the first
allocates the pinned buffers).
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import time

import torch

from lightning_offload.activation_checkpointing import CheckpointingConfig, activation_offloader, find_blocks

GIB = 2**30


def build(args: argparse.Namespace, policy: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                         num_key_value_heads=args.hidden // 128, max_position_embeddings=args.seq,
                         attn_implementation="sdpa", use_cache=False)
    with torch.device("cuda"):
        model = LlamaModel(config).to(torch.bfloat16)
    if policy == "offload (save_on_cpu)":
        for block in find_blocks(model):
            block.forward = functools.partial(_save_on_cpu, block.forward)
    else:
        CheckpointingConfig(policy=policy).apply(model)
    return model


def _save_on_cpu(forward, *args, **kwargs):
    with torch.autograd.graph.save_on_cpu(pin_memory=True):
        return forward(*args, **kwargs)


def measure(args: argparse.Namespace, policy: str) -> tuple[float, float, float]:
    """Median seconds per forward + backward, peak GPU GiB above the weights, pinned host GiB of the offloader."""
    model = build(args, policy)
    embeddings = torch.randn(args.micro_batch, args.seq, args.hidden, device="cuda", dtype=torch.bfloat16)
    times = []
    for step in range(2 + args.steps):
        torch.cuda.synchronize()
        if step == 2:
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        model(inputs_embeds=embeddings).last_hidden_state.float().square().mean().backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    peak = (torch.cuda.max_memory_allocated() - before) / GIB
    offloader = activation_offloader(model)
    host = offloader.pool.high_water_bytes / GIB if offloader and offloader.pool else 0.0
    del model, embeddings, offloader
    gc.collect()
    torch.cuda.empty_cache()
    return statistics.median(times[2:]), peak, host


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for policy in ("none", "full", "offload", "offload (save_on_cpu)"):
        try:
            rows.append((policy, *measure(args, policy)))
            print(f"RESULT {rows[-1]}", flush=True)
        except torch.OutOfMemoryError as error:
            print(f"{policy}: out of GPU memory ({str(error).splitlines()[0]})", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
    print(f"\nLlama stack: hidden {args.hidden}, {args.layers} layers, micro-batch {args.micro_batch} x {args.seq}, "
          f"bf16, on {torch.cuda.get_device_name()}")
    print(f"{'checkpointing':<24}{'s/step':>10}{'peak GPU GiB':>14}{'host GiB':>10}")
    for policy, seconds, peak, host in rows:
        print(f"{policy:<24}{seconds:>10.3f}{peak:>14.2f}{host:>10.2f}")


if __name__ == "__main__":
    main()
