"""`import lightning_offload` registers the strategy with both Lightning namespaces, without loading engines."""

from __future__ import annotations

import subprocess
import sys

import pytest

import lightning_offload


@pytest.mark.parametrize("namespace", ["lightning.pytorch", "pytorch_lightning"])
def test_registered_in_both_namespaces(namespace: str) -> None:
    lightning = pytest.importorskip(namespace)
    registry = lightning.strategies.StrategyRegistry
    assert {"single_gpu_offload", "single_gpu_offload_deepspeed"} <= set(registry)
    trainer = lightning.Trainer(strategy="single_gpu_offload", accelerator="cpu", devices=1, logger=False)
    assert isinstance(trainer.strategy, lightning.strategies.Strategy)
    assert type(trainer.strategy).__name__ == "SingleGPUOffloadStrategy"
    # "auto": the planner picks the backend at setup; a suffixed name pins it.
    assert trainer.strategy.backend_name is None
    pinned = lightning.Trainer(strategy="single_gpu_offload_deepspeed", accelerator="cpu", devices=1, logger=False)
    assert pinned.strategy.backend_name == "deepspeed"


def test_pytorch_lightning_trainer_fits() -> None:
    pl = pytest.importorskip("pytorch_lightning")
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    class Regression(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.layer(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.1)

    x = torch.randn(32, 4)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
    trainer = pl.Trainer(strategy="single_gpu_offload", accelerator="cpu", max_steps=4, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(Regression(), data)
    assert trainer.global_step == 4


def test_lightning_cli_accepts_the_strategy_name() -> None:
    from lightning.pytorch.cli import LightningCLI

    from lightning_offload.data import StdlibText
    from lightning_offload.models import CausalLM

    cli = LightningCLI(CausalLM, StdlibText, run=False, save_config_callback=None,
                       args=["--trainer.strategy", "single_gpu_offload", "--trainer.accelerator", "cpu"])
    assert isinstance(cli.trainer.strategy, lightning_offload.SingleGPUOffloadStrategy)


def test_import_loads_no_engine() -> None:
    code = "import sys, lightning_offload; print(sorted({'deepspeed', 'bitsandbytes'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
