"""A module that builds a tensor in its first step, as Lightning's demo transformer builds its positional table:
under every backend at `bf16-true` its step sees the dtypes a plain `bf16-true` run gives it (inputs, default dtype,
the tensor it builds), and at `bf16-mixed` it trains."""

from __future__ import annotations

import functools
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.conformance.runs import Run, run, strategies

WIDTH, BLOCKS, SAMPLES, BATCH = 8, 3, 8, 4
# The backend that refuses `bf16-true` (it runs bf16 compute on fp32 master weights only), by its message.
REFUSES_BF16_TRUE = {"fsdp": "not supported by the `fsdp` backend"}


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))


class _LazyTable(pl.LightningModule):
    """Adds a table it builds in its first forward, a plain tensor attribute in the default dtype, to its input."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(_Block() for _ in range(BLOCKS)))
        self.table: torch.Tensor | None = None
        self.dtypes_in_step: dict[str, torch.dtype] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.table is None:
            self.table = torch.ones(WIDTH, device=x.device)
        return self.blocks(x + self.table)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        self.dtypes_in_step.update(input=x.dtype, default=torch.get_default_dtype())
        loss = self(x).float().pow(2).mean()
        self.dtypes_in_step["built in forward"] = self.table.dtype
        return loss

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(SAMPLES, WIDTH)), batch_size=BATCH)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class _RecordDtypes(pl.Callback):
    def __init__(self) -> None:
        self.dtypes: dict[str, torch.dtype] = {}

    def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
        self.dtypes = dict(module.dtypes_in_step)


def _run(strategy: Any, precision: str) -> tuple[Run, dict[str, torch.dtype]]:
    recorder = _RecordDtypes()
    result = run("lazy_table", strategy, precision=precision, build=_LazyTable, callbacks=[recorder],
                 trainer_options=dict(max_epochs=1))
    return result, recorder.dtypes


@functools.cache
def _plain_bf16_true() -> dict[str, torch.dtype]:
    return _run("auto", "bf16-true")[1]


@pytest.mark.parametrize("backend", list(strategies()))
def test_a_tensor_built_in_the_step_gets_the_dtype_of_a_plain_bf16_true_run(backend: str) -> None:
    result, dtypes = _run(strategies()[backend](), "bf16-true")
    if backend in REFUSES_BF16_TRUE:
        assert result.refusal is not None and REFUSES_BF16_TRUE[backend] in result.refusal, result.refusal
        return
    assert result.refusal is None, result.refusal
    assert _plain_bf16_true()["built in forward"] == torch.bfloat16
    assert dtypes == _plain_bf16_true()


@pytest.mark.parametrize("backend", list(strategies()))
def test_a_tensor_built_in_the_step_meets_the_weights_in_their_dtype_at_bf16_mixed(backend: str) -> None:
    # Backends with bf16 weights and no autocast (deepspeed, gpu_8bit) build it in bf16; the others build it in fp32
    # and compute under autocast or cast each block's inputs (fsdp), as a plain `bf16-mixed` run does.
    result, _ = _run(strategies()[backend](), "bf16-mixed")
    assert result.refusal is None, result.refusal
    assert len(result.losses) == math.ceil(SAMPLES / BATCH) and all(map(math.isfinite, result.losses))
