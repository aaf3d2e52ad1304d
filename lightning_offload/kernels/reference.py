"""The pure-torch AdamW-8bit step: the CPU path and the oracle for the Triton kernel.

Every formula here is written in the same order as in `_triton_adamw8bit.py`, in fp32, so the two agree up to the
last-ulp differences of sqrt/log2/exp2 (a code may then land one step apart at a rounding boundary).
"""

from __future__ import annotations

from typing import Sequence

import torch

from lightning_offload.kernels.format import (
    BLOCK_SIZE,
    M_LEVELS,
    V_CODES_PER_OCTAVE,
    V_TOP_CODE,
    Bucket8bit,
    StepScalars,
    TensorStep,
)

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    # (x * constant) mod 2**32 for x < 2**32, in halves so no int64 product overflows.
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + ((x * high) << 16)) & _MASK32


def mix32_tensor(x: torch.Tensor) -> torch.Tensor:
    """`adamw8bit.mix32` elementwise on an int64 tensor of values below 2**32."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def decode_m(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    q = codes.float()
    return q * q.abs() * (absmax * (1.0 / (M_LEVELS * M_LEVELS)))[:, None]


def decode_v(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    c = codes.float()
    v = torch.exp2((c - V_TOP_CODE) * (1.0 / V_CODES_PER_OCTAVE)) * absmax[:, None]
    return torch.where(c > 0, v, 0.0)


def _reciprocal_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, 1.0 / torch.where(x > 0, x, 1.0), 0.0)


def encode_m(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    absmax = m.abs().amax(dim=1)
    q = torch.floor(M_LEVELS * torch.sqrt(m.abs() * _reciprocal_or_zero(absmax)[:, None]) + 0.5)
    return torch.where(m < 0, -q, q).to(torch.int8), absmax


def encode_v(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    absmax = v.amax(dim=1)
    ratio = torch.clamp_min(v * _reciprocal_or_zero(absmax)[:, None], 1.1754944e-38)  # keeps log2 finite
    c = torch.floor(V_CODES_PER_OCTAVE * torch.log2(ratio) + (V_TOP_CODE + 0.5)).clamp(1, V_TOP_CODE)
    return torch.where(v > 0, c, 0.0).to(torch.uint8), absmax


def stochastic_round_to_bf16(x: torch.Tensor, random_bits: torch.Tensor) -> torch.Tensor:
    """Adds 16 random bits below bf16's mantissa, then truncates: rounds up with probability = the dropped fraction."""
    bits = x.view(torch.int32).to(torch.int64) + (random_bits & 0xFFFF)
    rounded = (bits & ~0xFFFF).to(torch.int32).view(torch.float32)
    return torch.where(torch.isnan(x), x, rounded).to(torch.bfloat16)  # a NaN's bits may wrap: keep it NaN


def dequantize(bucket: Bucket8bit, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 m and v of one tensor of `bucket`, shaped like its parameter."""
    blocks, numel = bucket.blocks_of(index), bucket.params[index].numel()
    m = decode_m(bucket.m_codes[blocks], bucket.m_absmax[blocks])
    v = decode_v(bucket.v_codes[blocks], bucket.v_absmax[blocks])
    shape = bucket.params[index].shape
    return m.flatten()[:numel].view(shape), v.flatten()[:numel].view(shape)


def _padded_blocks(x: torch.Tensor, num_blocks: int) -> torch.Tensor:
    flat = torch.zeros(num_blocks * BLOCK_SIZE, dtype=torch.float32, device=x.device)
    flat[: x.numel()] = x.reshape(-1)
    return flat.view(num_blocks, BLOCK_SIZE)


@torch.no_grad()
def reference_update(bucket: Bucket8bit, work: Sequence[TensorStep], s: StepScalars,
                     stochastic_rounding: bool) -> None:
    m_codes, v_codes, m_absmax, v_absmax = bucket.m_codes, bucket.v_codes, bucket.m_absmax, bucket.v_absmax
    for item in work:
        param, blocks = bucket.params[item.index], bucket.blocks_of(item.index)
        num_blocks, numel = blocks.stop - blocks.start, param.numel()
        p = _padded_blocks(param, num_blocks)
        g = _padded_blocks(item.grad, num_blocks)
        m = decode_m(m_codes[blocks], m_absmax[blocks])
        v = decode_v(v_codes[blocks], v_absmax[blocks])

        m = (1.0 - item.m_weight) * m + item.m_weight * g
        v = (1.0 - item.v_weight) * v + item.v_weight * (g * g)
        p = p * s.decay - s.lr * (m / (torch.sqrt(v) + s.eps))

        m_codes[blocks], m_absmax[blocks] = encode_m(m)
        v_codes[blocks], v_absmax[blocks] = encode_v(v)
        p = p.flatten()[:numel]
        if param.dtype == torch.bfloat16 and stochastic_rounding:
            element = torch.arange(numel, dtype=torch.int64, device=p.device)
            p = stochastic_round_to_bf16(p, mix32_tensor(element ^ item.rounding_key))
        param.view(-1).copy_(p)  # fp32 -> bf16 copy rounds to nearest even
