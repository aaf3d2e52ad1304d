"""The Triton kernel of `fused_adamw8bit_step`: one launch updates every tensor of a bucket.

Multi-tensor layout: a per-step table holds one int64 row per tensor of the bucket (parameter and gradient
addresses, numel, first state block, rounding key, and two fp32 scalars as bits); a static per-bucket table of
work items, (tensor, first block), gives each program BLOCKS_PER_PROGRAM state blocks of one tensor. Each
program reads bf16/fp32 weights and gradients and the 8-bit state once, and writes weights and state once: about
10 bytes per parameter, the least an 8-bit AdamW can move.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from lightning_offload.kernels.format import (
    BLOCK_SIZE,
    M_LEVELS,
    RECORD_BYTES,
    V_CODES_PER_OCTAVE,
    V_TOP_CODE,
    Bucket8bit,
    StepScalars,
    TensorStep,
    fp32_bits,
)

# The tile of one program: BLOCKS_PER_PROGRAM blocks of 256 elements, NUM_WARPS warps (bench/studies/optim_update.py
# sweeps both; read at each launch).
BLOCKS_PER_PROGRAM = 4
NUM_WARPS = 4
_TORCH_TO_TRITON = {torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _mix32(x):
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _load(pointer, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(pointer, mask=mask, other=0)
    else:
        return tl.load(pointer)


@triton.jit
def _store(pointer, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(pointer, value, mask=mask)
    else:
        tl.store(pointer, value)


# FAST_MATH picks single-instruction approximations (tl.log2 calls libdevice's log2f, which branches on
# denormals; `/` handles out-of-range operands); the interpreter, which has no libdevice, gets the plain forms.
@triton.jit
def _log2(x, FAST_MATH: tl.constexpr):
    if FAST_MATH:
        return libdevice.fast_log2f(x)
    else:
        return tl.log2(x)


@triton.jit
def _divide(x, y, FAST_MATH: tl.constexpr):
    if FAST_MATH:
        return libdevice.fast_dividef(x, y)
    else:
        return x / y


@triton.jit
def _update_tile(
    param, grad, m_codes, v_codes, m_absmax_ptr, v_absmax_ptr, local, record_local, scale_rows, mask, row_mask,
    first, key,
    m_weight, v_weight, lr, eps, decay,
    PARAM_DTYPE: tl.constexpr, STOCHASTIC_ROUNDING: tl.constexpr, MASKED: tl.constexpr, FAST_MATH: tl.constexpr,
    M_LEVELS: tl.constexpr, V_TOP_CODE: tl.constexpr, V_CODES_PER_OCTAVE: tl.constexpr,
):
    p = _load(param + local, mask, MASKED).to(tl.float32)
    g = _load(grad + local, mask, MASKED).to(tl.float32)
    qm = _load(m_codes + record_local, mask, MASKED).to(tl.float32)
    qv = _load(v_codes + record_local, mask, MASKED).to(tl.float32)
    m_absmax = _load(m_absmax_ptr + scale_rows, row_mask, MASKED)
    v_absmax = _load(v_absmax_ptr + scale_rows, row_mask, MASKED)

    m = qm * tl.abs(qm) * (m_absmax * (1.0 / (M_LEVELS * M_LEVELS)))[:, None]
    v = tl.exp2((qv - V_TOP_CODE) * (1.0 / V_CODES_PER_OCTAVE)) * v_absmax[:, None]
    v = tl.where(qv > 0, v, 0.0)

    m = (1.0 - m_weight) * m + m_weight * g
    v = (1.0 - v_weight) * v + v_weight * (g * g)
    p = p * decay - lr * _divide(m, tl.sqrt(v) + eps, FAST_MATH)

    m_max = tl.max(tl.abs(m), axis=1)
    m_scale = tl.where(m_max > 0, 1.0 / tl.where(m_max > 0, m_max, 1.0), 0.0)
    # Non-negative before the int conversion, which truncates: truncating x + 0.5 rounds half up.
    qm = (M_LEVELS * tl.sqrt(tl.abs(m) * m_scale[:, None]) + 0.5).to(tl.int8)
    qm = tl.where(m < 0, -qm, qm)
    v_max = tl.max(v, axis=1)
    v_scale = tl.where(v_max > 0, 1.0 / tl.where(v_max > 0, v_max, 1.0), 0.0)
    ratio = tl.maximum(v * v_scale[:, None], 1.1754944e-38)  # keeps log2 finite; v = 0 gets code 0 below
    qv = V_CODES_PER_OCTAVE * _log2(ratio, FAST_MATH) + (V_TOP_CODE + 0.5)
    qv = tl.where(v > 0, tl.minimum(tl.maximum(qv, 1.0), V_TOP_CODE + 0.5), 0.0).to(tl.uint8)
    _store(m_codes + record_local, qm, mask, MASKED)
    _store(v_codes + record_local, qv, mask, MASKED)
    _store(m_absmax_ptr + scale_rows, m_max, row_mask, MASKED)
    _store(v_absmax_ptr + scale_rows, v_max, row_mask, MASKED)

    if PARAM_DTYPE == tl.bfloat16:  # round in integer arithmetic, then truncate to bf16's 16 high bits
        bits = p.to(tl.uint32, bitcast=True)
        if STOCHASTIC_ROUNDING:
            rounding = _mix32((first + local).to(tl.uint32) ^ key) & 0xFFFF
        else:  # to nearest, ties to even (the interpreter's own fp32 -> bf16 cast truncates)
            rounding = 0x7FFF + ((bits >> 16) & 1)
        rounded = ((bits + rounding) & 0xFFFF0000).to(tl.float32, bitcast=True)
        p = tl.where(p != p, p, rounded)  # a NaN's bits may wrap: keep it NaN
    _store(param + local, p.to(PARAM_DTYPE), mask, MASKED)


@triton.jit
def _adamw8bit_kernel(
    items, table, state, lr, eps, decay,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, STOCHASTIC_ROUNDING: tl.constexpr,
    ALIGNED: tl.constexpr, FAST_MATH: tl.constexpr, BLOCKS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    RECORD_BYTES: tl.constexpr, M_LEVELS: tl.constexpr, V_TOP_CODE: tl.constexpr, V_CODES_PER_OCTAVE: tl.constexpr,
):
    item = tl.program_id(0)
    tensor = tl.load(items + 2 * item)
    first_block = tl.load(items + 2 * item + 1)
    row = table + tensor * 7
    param = tl.load(row).to(tl.pointer_type(PARAM_DTYPE))
    grad_address = tl.load(row + 1)
    grad = grad_address.to(tl.pointer_type(GRAD_DTYPE))
    if ALIGNED:  # lets the compiler use 16-byte loads and stores
        param = tl.multiple_of(param, 16)
        grad = tl.multiple_of(grad, 16)
    numel = tl.load(row + 2)
    state_block = tl.load(row + 3) + first_block
    key = tl.load(row + 4).to(tl.uint32)
    m_weight = tl.load(row + 5).to(tl.uint32).to(tl.float32, bitcast=True)
    v_weight = tl.load(row + 6).to(tl.uint32).to(tl.float32, bitcast=True)

    first = first_block * BLOCK_SIZE
    # A tensor without a gradient this step has nothing remaining: it keeps its weights and state.
    remaining = tl.where(grad_address != 0, numel - first, 0).to(tl.int32)
    rows = tl.arange(0, BLOCKS)
    local = rows[:, None] * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)[None, :]
    mask = local < remaining
    row_mask = rows * BLOCK_SIZE < remaining
    param += first
    grad += first
    records = state + state_block * RECORD_BYTES
    m_codes = records.to(tl.pointer_type(tl.int8))
    v_codes = records + BLOCK_SIZE
    record_local = rows[:, None] * RECORD_BYTES + tl.arange(0, BLOCK_SIZE)[None, :]
    m_absmax = (records + 2 * BLOCK_SIZE).to(tl.pointer_type(tl.float32))
    v_absmax = (records + 2 * BLOCK_SIZE + 4).to(tl.pointer_type(tl.float32))
    scale_rows = rows * (RECORD_BYTES // 4)
    # Full tiles go unmasked: a mask that may end anywhere would stop the compiler from vectorising.
    if remaining >= BLOCKS * BLOCK_SIZE:
        _update_tile(param, grad, m_codes, v_codes, m_absmax, v_absmax, local, record_local, scale_rows, mask,
                     row_mask, first, key, m_weight, v_weight, lr, eps, decay, PARAM_DTYPE, STOCHASTIC_ROUNDING,
                     False, FAST_MATH, M_LEVELS, V_TOP_CODE, V_CODES_PER_OCTAVE)
    else:
        _update_tile(param, grad, m_codes, v_codes, m_absmax, v_absmax, local, record_local, scale_rows, mask,
                     row_mask, first, key, m_weight, v_weight, lr, eps, decay, PARAM_DTYPE, STOCHASTIC_ROUNDING,
                     True, FAST_MATH, M_LEVELS, V_TOP_CODE, V_CODES_PER_OCTAVE)


def _work_items(bucket: Bucket8bit, blocks_per_program: int) -> torch.Tensor:
    """(tensor index, first block) of every program, built once per bucket and tile size."""
    cache = bucket.kernel_tables
    if blocks_per_program not in cache:
        parts = []
        for index in range(len(bucket.params)):
            blocks = bucket.blocks_of(index)
            first = torch.arange(0, blocks.stop - blocks.start, blocks_per_program, dtype=torch.int32)
            parts.append(torch.stack([torch.full_like(first, index), first], dim=1))
        cache[blocks_per_program] = torch.cat(parts).to(bucket.params[0].device)
    return cache[blocks_per_program]


def triton_update(bucket: Bucket8bit, work: Sequence[TensorStep], s: StepScalars, stochastic_rounding: bool) -> None:
    grad_dtypes = {item.grad.dtype for item in work}
    if len(grad_dtypes) != 1 or not grad_dtypes <= set(_TORCH_TO_TRITON):
        raise ValueError(f"The gradients of one step must share one dtype, bf16 or fp32; got {grad_dtypes}.")
    # Columns: param address, grad address (0: no gradient), numel, first state block, rounding key, m_weight and
    # v_weight as fp32 bits. The kernel reads rows of 7.
    table = [[p.data_ptr(), 0, p.numel(), first, 0, 0, 0] for p, first in zip(bucket.params, bucket.block_offsets)]
    for item in work:
        table[item.index][1] = item.grad.data_ptr()
        table[item.index][4:] = [item.rounding_key, fp32_bits(item.m_weight), fp32_bits(item.v_weight)]
    aligned = all(row[0] % 16 == 0 and row[1] % 16 == 0 for row in table)
    device = bucket.params[0].device
    table = torch.tensor(table, dtype=torch.int64).to(device, non_blocking=True)
    items = _work_items(bucket, BLOCKS_PER_PROGRAM)
    if len(items) == 0:  # only empty tensors
        return
    param_dtype = bucket.params[0].dtype
    _adamw8bit_kernel[(len(items),)](
        items, table, bucket.state, s.lr, s.eps, s.decay,
        PARAM_DTYPE=_TORCH_TO_TRITON[param_dtype], GRAD_DTYPE=_TORCH_TO_TRITON[grad_dtypes.pop()],
        STOCHASTIC_ROUNDING=stochastic_rounding and param_dtype == torch.bfloat16, ALIGNED=aligned,
        FAST_MATH=os.environ.get("TRITON_INTERPRET") != "1", BLOCKS=BLOCKS_PER_PROGRAM, BLOCK_SIZE=BLOCK_SIZE,
        RECORD_BYTES=RECORD_BYTES, M_LEVELS=M_LEVELS, V_TOP_CODE=V_TOP_CODE, V_CODES_PER_OCTAVE=V_CODES_PER_OCTAVE,
        num_warps=NUM_WARPS,
    )
