"""Fused optimizer kernels. Importing this package loads neither Triton nor bitsandbytes."""

from lightning_offload.kernels.adamw8bit import BLOCK_SIZE, Bucket8bit, fused_adamw8bit_step
from lightning_offload.kernels.optimizer import AdamW8bitFused

__all__ = ["BLOCK_SIZE", "AdamW8bitFused", "Bucket8bit", "fused_adamw8bit_step"]
