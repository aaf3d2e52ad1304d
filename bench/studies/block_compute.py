"""Where a decoder block's step time goes on the GPU, against the benchmark's compute limit.

One Llama decoder layer of a benchmark size (bf16 weights, micro-batch 4 x 2048), checkpointed like every plan
does (forward, recomputed forward, backward), timed three ways, each printed as a ratio to the limit that
bench/limits.py charges a block (8 x matmul params x tokens at the 8192^3 bf16 matmul rate):
- `matmuls`: the block's GEMMs alone at their own shapes (what the limit would be at the shapes' real rate);
- `eager`: the `transformers` layer as users run it;
- `compiled`: the same layer under `torch.compile` (elementwise work fused by Inductor);
- `compiled_cudnn`: compiled, with SDPA held to cuDNN's attention kernel instead of the default flash kernel;
- `attention_flash`, `attention_cudnn`: the layer's attention alone (causal SDPA, forward twice and backward).

    python -m bench.studies.block_compute --sizes 19b,32.8b
"""

from __future__ import annotations

import argparse
import json


import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from bench import RESULT_PREFIX
from bench.limits import MATMUL
from bench.models import SIZES
from bench.probe import _seconds, attention_seconds, gemm_seconds, matmul

MICRO_BATCH, SEQ = 4, 2048


def _ms(work, repeats: int) -> float:
    return _seconds(work, repeats, True) * 1e3


def gemm_ms(size: str) -> float:
    """Forward, recomputed forward and both backward GEMMs (input and weight gradients) of one block."""
    return gemm_seconds(SIZES[size].block_weights, MICRO_BATCH * SEQ)[1] * 1e3


def block_ms(size: str, compiled: bool, attention: SDPBackend | None = None) -> float:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = SIZES[size].llama_config()
    layer = LlamaDecoderLayer(config, layer_idx=0).to(device="cuda", dtype=torch.bfloat16)
    rotary = LlamaRotaryEmbedding(config).to("cuda")
    hidden = torch.randn(MICRO_BATCH, SEQ, config.hidden_size, dtype=torch.bfloat16, device="cuda",
                         requires_grad=True)
    positions = torch.arange(SEQ, device="cuda").unsqueeze(0)
    cos, sin = rotary(hidden, positions)
    if compiled:
        torch._dynamo.reset()  # the attention kernel is chosen while tracing: never reuse another variant's graph
    run = torch.compile(layer) if compiled else layer

    def step() -> None:
        out = checkpoint(run, hidden, position_embeddings=(cos, sin), position_ids=positions, use_reentrant=False)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))
        layer.zero_grad(set_to_none=True)
        hidden.grad = None

    if attention is None:
        return _ms(step, 10)
    with sdpa_kernel(attention):
        return _ms(step, 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="19b,32.8b")
    args = parser.parse_args()
    rate = matmul()[MATMUL]
    print(f"bf16 matmul 8192^3: {rate:.0f} TFLOP/s")
    for size in args.sizes.split(","):
        shape = SIZES[size]
        limit = 8 * shape.block_params * MICRO_BATCH * SEQ / (rate * 1e12) * 1e3
        row = {"size": size, "limit_ms": round(limit, 2), "matmuls_ms": round(gemm_ms(size), 2),
               "eager_ms": round(block_ms(size, compiled=False), 2),
               "compiled_ms": round(block_ms(size, compiled=True), 2)}
        try:
            row["compiled_cudnn_ms"] = round(block_ms(size, True, SDPBackend.CUDNN_ATTENTION), 2)
        except RuntimeError as error:  # no cuDNN attention for this GPU or shape
            row["compiled_cudnn_ms"] = f"{type(error).__name__}: {str(error)[:120]}"
        for backend in ("flash", "cudnn"):
            measured = attention_seconds(size, backend, MICRO_BATCH, SEQ)
            row[f"attention_{backend}_ms"] = None if measured is None else round(measured * 1e3, 2)
        for key, value in list(row.items()):
            if key.endswith("_ms") and key != "limit_ms" and isinstance(value, float):
                row[key.replace("_ms", "_over_limit")] = round(value / limit, 3)
        torch.cuda.empty_cache()
        print(RESULT_PREFIX + json.dumps(row))


if __name__ == "__main__":
    main()
