"""The 8-bit AdamW state format shared by the fused step (`adamw8bit`), its Triton kernel and its reference.

State format (`BLOCK_SIZE` = 256 elements a block; every tensor starts on a fresh block, so no block straddles
two tensors). A bucket's state is one contiguous uint8 buffer, `bucket.state`, of one 528-byte record a block:

    [ m codes: int8 x 256 | v codes: uint8 x 256 | m absmax: fp32 | v absmax: fp32 | 8 bytes of padding ]

2.06 bytes per element; the padding keeps every record 16-byte aligned for vector loads. A tensor's state is
thus one contiguous byte range (`bucket.tensor_state(i)`), and the streaming plan moves a bucket's state with
one copy of `bucket.state` (assign the copy back to `bucket.state`); the kernel reads and writes it in place.
`bucket.m_codes`, `v_codes`, `m_absmax`, `v_absmax` are strided views into it.

- m (first moment): signed square-root code, m = absmax * sign(q) * (q / 127)^2 with q in [-127, 127].
  A linear int8 code zeroes every element under absmax/254, which throws away the momentum of the small-gradient
  elements that share a block with a large one; the square root keeps elements down to absmax/64516.
- v (second moment): logarithmic code, v = absmax * 2^((c - 255) / 12) for c in [1, 255] and v = 0 for c = 0.
  Linear 8-bit quantisation of v is the classic failure: a small v in a block with a large absmax rounds to 0
  and m / (sqrt(v) + eps) explodes. Here one rounding errs by at most 2.9% in v (1.5% in sqrt(v)) anywhere in
  the 21 octaves below the block's absmax, a positive v below that range is rounded *up* to code 1, and only
  v = 0 (whose m is 0 too) gets code 0: a small v next to a large one cannot make a large update.
- Both moments are stored bias-corrected (m / (1 - beta1^t), v / (1 - beta2^t), updated with the EMA weights
  (1 - beta) / (1 - beta^t)), and both scales are the block's absmax of the new fp32 moment, recomputed every
  step: a change common to the whole block goes into the fp32 scale exactly; only per-element deviations round.
- Codes are rounded to nearest, not stochastically: the state is an EMA with beta2 = 0.999, and fresh rounding
  noise every step would accumulate to ~22x its size (1 / sqrt(1 - beta2^2)). The price is that a per-step
  change below half a code is dropped, so an element's v lags its true value (how far: bench/RESULTS.md, "Figures
  moved out of the code"); `tests/kernels/test_adamw8bit.py` checks a 1e4x spread of gradient scales against
  bitsandbytes.

Weights are updated in fp32 and written back to bf16 with stochastic rounding: 16 random bits are added below
bf16's mantissa before truncation, so an update smaller than half a bf16 ulp still moves the weight with the
right probability. The bits come from a counter-based hash of (seed, tensor key, tensor step, element index),
identical in torch and Triton, so a resumed run draws the same bits and CPU and GPU round alike.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

BLOCK_SIZE = 256
RECORD_BYTES = 2 * BLOCK_SIZE + 16  # codes of m and v, their two fp32 scales, padding to a multiple of 16
M_LEVELS = 127  # m codes are -127..127
V_TOP_CODE = 255  # v code of the block's absmax
V_CODES_PER_OCTAVE = 12
_MASK32 = 0xFFFFFFFF


def mix32(x: int) -> int:
    """A 32-bit integer hash (lowbias32); the kernel and `reference.mix32_tensor` compute the same function."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    x ^= x >> 16
    return x


def rounding_key(seed: int, tensor_key: int, step: int) -> int:
    """The per-(tensor, step) key; element i of the tensor draws its rounding bits from mix32(i ^ key)."""
    return mix32(mix32(mix32(seed) ^ (tensor_key & _MASK32)) ^ (step & _MASK32))


def round_to_fp32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def fp32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


@dataclass(eq=False)
class Bucket8bit:
    """Parameters of one dtype on one device and their AdamW state, which lives in one byte buffer `state`."""

    params: list[torch.Tensor]
    state: torch.Tensor
    block_offsets: list[int]  # first state block of each tensor
    keys: list[int]  # stable per-tensor identity for the rounding bits (the optimizer uses the param's index)
    steps: list[int] = field(default_factory=list)  # AdamW steps taken by each tensor
    kernel_tables: dict = field(default_factory=dict, repr=False)  # static device tables the kernel builds once

    @classmethod
    def create(cls, params: Sequence[torch.Tensor], *, device: torch.device | str | None = None,
               keys: Sequence[int] | None = None) -> "Bucket8bit":
        params = list(params)
        if not params:
            raise ValueError("`Bucket8bit.create` needs at least one parameter.")
        dtypes, devices = {p.dtype for p in params}, {p.device for p in params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(f"A bucket holds one dtype on one device; got {sorted(map(str, dtypes))} on "
                             f"{sorted(map(str, devices))}. Make one bucket per (dtype, device).")
        if params[0].dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"Parameters must be bf16 or fp32, not {params[0].dtype}.")
        if any(not p.is_contiguous() for p in params):
            raise ValueError("Parameters must be contiguous.")
        if any(p.numel() >= 2**31 for p in params):
            raise ValueError("Tensors of 2**31 elements or more are not supported.")
        block_offsets, total = [], 0
        for p in params:
            block_offsets.append(total)
            total += math.ceil(p.numel() / BLOCK_SIZE)
        keys = list(range(len(params))) if keys is None else [int(k) for k in keys]
        if len(keys) != len(params):
            raise ValueError(f"`keys` has {len(keys)} entries for {len(params)} parameters.")
        state = torch.zeros(total * RECORD_BYTES, dtype=torch.uint8, device=device or params[0].device)
        return cls(params, state, block_offsets, keys, [0] * len(params))

    @property
    def num_blocks(self) -> int:
        return len(self.state) // RECORD_BYTES

    @property
    def records(self) -> torch.Tensor:
        return self.state.view(-1, RECORD_BYTES)

    @property
    def m_codes(self) -> torch.Tensor:
        return self.records[:, :BLOCK_SIZE].view(torch.int8)

    @property
    def v_codes(self) -> torch.Tensor:
        return self.records[:, BLOCK_SIZE: 2 * BLOCK_SIZE]

    @property
    def m_absmax(self) -> torch.Tensor:
        return self.records[:, 2 * BLOCK_SIZE: 2 * BLOCK_SIZE + 4].view(torch.float32)[:, 0]

    @property
    def v_absmax(self) -> torch.Tensor:
        return self.records[:, 2 * BLOCK_SIZE + 4: 2 * BLOCK_SIZE + 8].view(torch.float32)[:, 0]

    def blocks_of(self, index: int) -> slice:
        first = self.block_offsets[index]
        return slice(first, first + math.ceil(self.params[index].numel() / BLOCK_SIZE))

    def tensor_state(self, index: int) -> torch.Tensor:
        """One tensor's records, a [blocks, RECORD_BYTES] uint8 view into `state`."""
        return self.records[self.blocks_of(index)]


@dataclass(frozen=True)
class StepScalars:
    """The step's hyperparameters, rounded to fp32 once so that the kernel and the reference use the same values."""

    lr: float
    eps: float
    decay: float  # 1 - lr * weight_decay (decoupled weight decay)


@dataclass(frozen=True)
class TensorStep:
    """One tensor's share of a step: where it is and its step-dependent scalars."""

    index: int  # position in the bucket
    grad: torch.Tensor
    m_weight: float  # (1 - beta1) / (1 - beta1^step): the EMA weight of the bias-corrected first moment, fp32
    v_weight: float  # (1 - beta2) / (1 - beta2^step), likewise for the second moment
    rounding_key: int
