"""Where a decoder block's step time goes on the GPU, against the benchmark's compute limit.

One Llama decoder layer of a benchmark size (bf16 weights, micro-batch 4 x 2048), checkpointed like every plan
does (forward, recomputed forward, backward), timed three ways, each printed as a ratio to the limit that
bench/limits.py charges a block (8 x matmul params x tokens at the 8192^3 bf16 matmul rate):
- `matmuls`: the block's GEMMs alone at their own shapes (what the limit would be at the shapes' real rate);
- `eager`: the `transformers` layer as users run it;
- `compiled`: the same layer under `torch.compile` (elementwise work fused by Inductor).

    python bench/block_compute.py --sizes 19b,32.8b
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/block_compute.py`: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.checkpoint import checkpoint

from bench import RESULT_PREFIX
from bench.limits import MATMUL
from bench.models import SIZES
from bench.probe import block_weights, gemm_seconds, matmul

MICRO_BATCH, SEQ = 4, 2048


def _cuda_ms(work, repeats: int) -> float:
    for _ in range(2):
        work()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        work()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def gemm_ms(size: str) -> float:
    """Forward, recomputed forward and both backward GEMMs (input and weight gradients) of one block."""
    return gemm_seconds(block_weights(SIZES[size]), MICRO_BATCH * SEQ)[1] * 1e3


def block_ms(size: str, compiled: bool) -> float:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = SIZES[size].llama_config()
    layer = LlamaDecoderLayer(config, layer_idx=0).to(device="cuda", dtype=torch.bfloat16)
    rotary = LlamaRotaryEmbedding(config).to("cuda")
    hidden = torch.randn(MICRO_BATCH, SEQ, config.hidden_size, dtype=torch.bfloat16, device="cuda",
                         requires_grad=True)
    positions = torch.arange(SEQ, device="cuda").unsqueeze(0)
    cos, sin = rotary(hidden, positions)
    run = torch.compile(layer) if compiled else layer

    def step() -> None:
        out = checkpoint(run, hidden, position_embeddings=(cos, sin), position_ids=positions, use_reentrant=False)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))
        layer.zero_grad(set_to_none=True)
        hidden.grad = None

    return _cuda_ms(step, 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="19b,32.8b")
    args = parser.parse_args()
    rate = matmul()[MATMUL]
    print(f"bf16 matmul 8192^3: {rate:.0f} TFLOP/s")
    for size in args.sizes.split(","):
        shape = SIZES[size]
        block_params = (shape.matmul_params - shape.vocab * shape.hidden - shape.hidden) // shape.layers
        limit = 8 * block_params * MICRO_BATCH * SEQ / (rate * 1e12) * 1e3
        row = {"size": size, "limit_ms": round(limit, 2), "matmuls_ms": round(gemm_ms(size), 2)}
        for compiled in (False, True):
            row["compiled_ms" if compiled else "eager_ms"] = round(block_ms(size, compiled), 2)
        for key in ("matmuls_ms", "eager_ms", "compiled_ms"):
            row[key.replace("_ms", "_over_limit")] = round(row[key] / limit, 3)
        torch.cuda.empty_cache()
        print(RESULT_PREFIX + json.dumps(row))


if __name__ == "__main__":
    main()
