"""The planner's pre-flight is invisible to the user's program: random numbers, data order, hook side effects and
module state are those of `strategy="auto"`."""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_offload import SingleGPUOffloadStrategy
from lightning_offload.planner import measure_module


class DrawsEverywhere(pl.LightningModule):
    """Draws from every random stream the user can seed in every hook, counts its hook calls, shuffles with its own
    generator and caches a tensor in its first forward."""

    def __init__(self) -> None:
        super().__init__()
        self.draws: list[tuple[str, float, float, float]] = []
        self.hook_calls = {"train_dataloader": 0, "configure_optimizers": 0}
        self.shuffle_generator = torch.Generator().manual_seed(1)
        self.net: nn.Module | None = None
        self.cached_scale: torch.Tensor | None = None
        self.seen: list[torch.Tensor] = []

    def draw(self, where: str) -> None:
        self.draws.append((where, torch.rand(()).item(), float(np.random.rand()), random.random()))

    def configure_model(self) -> None:
        if self.net is None:
            self.draw("configure_model")
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cached_scale is None:
            self.cached_scale = torch.ones((), device=x.device)
        return self.net(x) * self.cached_scale

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.draw("training_step")
        inputs, targets = batch
        self.seen.append(inputs)
        return nn.functional.mse_loss(self(inputs), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        self.hook_calls["configure_optimizers"] += 1
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        self.hook_calls["train_dataloader"] += 1
        self.draw("train_dataloader")
        data = TensorDataset(torch.randn(16, 4), torch.randn(16, 1))
        return DataLoader(data, batch_size=4, shuffle=True, generator=self.shuffle_generator)


def fit(strategy: Any) -> DrawsEverywhere:
    pl.seed_everything(0, verbose=False)
    module = DrawsEverywhere()
    pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(module)
    return module


def test_seeded_run_draws_sees_and_counts_what_it_does_under_auto() -> None:
    reference = fit("auto")
    planned = fit(SingleGPUOffloadStrategy(backend="device"))
    assert planned.draws == reference.draws
    assert all(torch.equal(a, b) for a, b in zip(planned.seen, reference.seen, strict=True))
    assert planned.hook_calls == reference.hook_calls == {"train_dataloader": 1, "configure_optimizers": 1}
    assert planned.cached_scale.device.type == "cpu"


class LazyTable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)
        self.table: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.table is None:
            self.table = torch.arange(4.0, device=x.device)
            self.extra = nn.Linear(4, 4, device=x.device)
        return self.norm(self.linear(x) + self.table)


def test_measuring_leaves_attributes_parameters_and_buffers_as_they_were() -> None:
    module = LazyTable()
    before = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    tensors = {name: tensor for name, tensor in module.state_dict(keep_vars=True).items()}
    measure_module(module, torch.randn(2, 4), dtype=torch.bfloat16)
    assert module.table is None and not hasattr(module, "extra")
    assert set(module.state_dict()) == set(before)
    for name, tensor in module.state_dict(keep_vars=True).items():
        assert tensor is tensors[name] and torch.equal(tensor, before[name])
