"""The limit step time of a cell: the fastest that method's step could run on this machine.

    limit = max(GPU time, PCIe time, CPU optimizer time)

- GPU time = 8 x (params - input embedding) x tokens / measured bf16 matmul rate, the forward (2), its recompute
  under full checkpointing (2) and the backward (4), plus the attention every step runs besides those GEMMs
  (softmax(QK^T)V, left out of model TFLOP/s): the probe times each size's causal SDPA at the benchmark's
  micro-batch (forward, its recompute and backward, the faster of the flash and cuDNN kernels; 4-6% of a step).
  A plan that recomputes only a share of the blocks (`Cost.recompute_share`) is charged 6 + 2 x share instead of
  8, its attention in the same proportion.
  The rate is the one the probe measured on the model's own GEMMs (each projection and the output layer at the
  cell's tokens, forward and both backward GEMMs): on the H100 those shapes run 3-14% below the 8192^3 rate, which
  is used where the probe has no figure for the size.
  An optimizer that runs on the GPU adds its time here: it shares the GPU with the matmuls.
- PCIe time = the bytes the method must move, over the measured pinned bandwidth of each direction and of both at
  once: max(d2h / d2h_bw, h2d / h2d_bw, (d2h + h2d) / duplex_bw).
- CPU optimizer time = parameters updated per step / the measured rate of the method's CPU optimizer.

The byte counts are what each engine must move at the least (e.g. ZeRO-2 offload copies gradients as fp32); extra
copies an engine makes (accumulating on the host through the GPU, re-fetching parameters) count against it, so the
limit is a lower bound and measured/limit says how far the engine is from this machine's hardware.
"""

from __future__ import annotations

from dataclasses import dataclass

# Probe keys (bench/probe.py) the arithmetic reads.
MATMUL = "bf16_matmul_TFLOPs"
H2D, D2H, DUPLEX = "h2d_pinned_GBps", "d2h_pinned_GBps", "duplex_pinned_GBps"
CPU_ADAMW_FUSED = "cpu_adamw_fused_Gparam_per_s"
CPU_ADAMW_FOREACH = "cpu_adamw_foreach_Gparam_per_s"
CPU_DEEPSPEED_ADAM = "cpu_deepspeed_adam_Gparam_per_s"
GPU_ADAMW_FUSED = "gpu_adamw_fused_fp32_Gparam_per_s"
GPU_BNB_ADAMW8BIT = "gpu_bnb_adamw8bit_Gparam_per_s"
GPU_FUSED_ADAMW8BIT = "gpu_fused_adamw8bit_Gparam_per_s"
# Share of the weights the streaming plan streams at the sizes it is for (a quarter at 32.8B on an 80 GB card).
STREAMED_SHARE = 0.25


@dataclass(frozen=True)
class Cost:
    """What a method's optimizer step costs besides the matmuls, per parameter."""

    optimizer_rate: str
    """Probe key of the update rate of the method's optimizer (Gparam/s)."""
    optimizer_on_gpu: bool = False
    d2h_per_micro_batch: float = 0.0
    """Bytes per parameter sent to the host every micro-batch (gradients)."""
    h2d_per_micro_batch: float = 0.0
    """Bytes per parameter sent to the GPU every micro-batch (parameters streamed in for forward and backward)."""
    h2d_per_step: float = 0.0
    """Bytes per parameter sent to the GPU once per optimizer step (updated parameters)."""
    d2h_per_step: float = 0.0
    """Bytes per parameter sent to the host once per optimizer step (gradients accumulated on the GPU)."""
    updated_share: float = 1.0
    """Share of the parameters updated per step: ZenFlow's CPU update runs once every 4 steps."""
    recompute_share: float = 1.0
    """Share of the blocks whose forward is recomputed in backward: 1 under the benchmark's checkpointing of every
    layer; a plan that checkpoints fewer blocks (or offloads activations instead) computes less."""


# Referred to by name from bench/methods.py and, for single_gpu_offload's backends, from bench/matrix.yaml.
COSTS = {
    "gpu_adamw": Cost(GPU_ADAMW_FUSED, optimizer_on_gpu=True),
    "gpu_8bit_adamw": Cost(GPU_BNB_ADAMW8BIT, optimizer_on_gpu=True),
    # lightning_offload's fused 8-bit AdamW (bench/NOTES_kernel.md), inside backward on the GPU.
    "gpu_fused_8bit_adamw": Cost(GPU_FUSED_ADAMW8BIT, optimizer_on_gpu=True),
    # bf16 gradients out, bf16 parameters back, fused AdamW on the host's bf16 copy. With offload_gradients=False
    # the gradients accumulate on the GPU and each micro-batch's backward still copies their running sum out.
    "torchao_offload": Cost(CPU_ADAMW_FUSED, d2h_per_micro_batch=2, h2d_per_step=2),
    # Gradients are cast to fp32 on the GPU before the copy; fp32 master weights are copied back and cast there.
    "zero2_offload": Cost(CPU_DEEPSPEED_ADAM, d2h_per_micro_batch=4, h2d_per_step=4),
    "zenflow": Cost(CPU_DEEPSPEED_ADAM, d2h_per_micro_batch=4, h2d_per_step=1, updated_share=0.25),
    # bf16 parameters streamed in for the forward and again for the backward (recompute included); fp32
    # gradients out; the update happens in host memory where the parameters live.
    "zero3_offload": Cost(CPU_DEEPSPEED_ADAM, d2h_per_micro_batch=4, h2d_per_micro_batch=4),
    # FSDP keeps fp32 parameters on the host under bf16-mixed: 4 bytes in for the forward, 4 for the backward.
    "fsdp_cpu_offload": Cost(CPU_ADAMW_FOREACH, d2h_per_micro_batch=4, h2d_per_micro_batch=8),
    # The same with the user's AdamW fused (Lightning's FSDP preset, tuned).
    "fsdp1_cpu_offload_fused": Cost(CPU_ADAMW_FUSED, d2h_per_micro_batch=4, h2d_per_micro_batch=8),
    # lightning_offload's fsdp backend steps a torch Adam/AdamW left at torch's defaults with the fused CPU kernel,
    # and adds accumulated gradients up on the GPU: they leave once per step.
    "fsdp_cpu_offload_fused": Cost(CPU_ADAMW_FUSED, d2h_per_step=4, h2d_per_micro_batch=8),
    # 8-bit state (2.0625 B/param) in and out once a step; streamed bf16 weights in for forward and again for
    # recompute + backward, updated ones back once (counted per micro-batch: R1 has one).
    "stream": Cost(GPU_FUSED_ADAMW8BIT, optimizer_on_gpu=True, h2d_per_step=2.0625,
                   h2d_per_micro_batch=4 * STREAMED_SHARE, d2h_per_micro_batch=2.0625 + 2 * STREAMED_SHARE),
    # Gradients accumulate on the GPU and leave once per step as fp32; bf16 parameters come back once per step.
    "host_adam": Cost(CPU_ADAMW_FUSED, d2h_per_step=4, h2d_per_step=2),
}


def model_matmul_key(size: str) -> str:
    """Probe key of the bf16 rate of one model size's own GEMMs."""
    return f"{MATMUL}_{size}"


def attention_key(size: str) -> str:
    """Probe key of one model size's attention time per micro-batch of 4 x 2048 tokens, all layers (ms)."""
    return f"sdpa_causal_ms_{size}"


@dataclass(frozen=True)
class Limit:
    step_s: float
    bound: str
    """Which part sets the limit: "compute", "pcie" or "cpu optimizer"."""
    parts_s: dict[str, float]


def limit_step(params: int, matmul_params: int, tokens_per_micro_batch: int, accumulate: int, cost: Cost,
               probe: dict[str, float], size: str | None = None) -> Limit:
    """Raises KeyError naming the probe figure that is missing (e.g. DeepSpeed's CPU Adam did not build).

    Without `size` (or a probe that lacks the size's figures) the compute term is the GEMMs at the 8192^3 rate.
    """
    tokens = tokens_per_micro_batch * accumulate
    matmul_rate = probe.get(model_matmul_key(size), probe[MATMUL]) if size else probe[MATMUL]
    attention = probe.get(attention_key(size), 0.0) / 1e3 * accumulate if size else 0.0
    passes = 6 + 2 * cost.recompute_share  # forward 2, backward 4, recomputed forward 2 per recomputed block
    compute = passes * matmul_params * tokens / (matmul_rate * 1e12) + attention * passes / 8
    optimizer = params * cost.updated_share / (probe[cost.optimizer_rate] * 1e9)
    d2h = params * (cost.d2h_per_micro_batch * accumulate + cost.d2h_per_step)
    h2d = params * (cost.h2d_per_micro_batch * accumulate + cost.h2d_per_step)
    pcie = 0.0
    if d2h or h2d:
        pcie = max(d2h / (probe[D2H] * 1e9), h2d / (probe[H2D] * 1e9), (d2h + h2d) / (probe[DUPLEX] * 1e9))
    parts = {
        "compute": compute + (optimizer if cost.optimizer_on_gpu else 0.0),
        "pcie": pcie,
        "cpu optimizer": 0.0 if cost.optimizer_on_gpu else optimizer,
    }
    bound = max(parts, key=parts.__getitem__)
    return Limit(step_s=parts[bound], bound=bound, parts_s=parts)
