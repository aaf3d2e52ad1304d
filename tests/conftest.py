"""Shared fixtures: a tiny transformer LightningModule, deterministic data, and the `gpu` mark's skip."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_offload.models import TinyGPT

VOCAB, SEQ_LEN, BATCH = 64, 16, 4


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _quiet_known_warnings() -> None:
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*sync_dist=True.*")


def token_batches(num_batches: int, seed: int = 0, batch_size: int = BATCH) -> DataLoader:
    """Learnable sequences (each token is the previous plus a per-sequence stride), in a fixed order."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, VOCAB, (num_batches * batch_size, 1), generator=generator)
    strides = torch.randint(1, 4, (num_batches * batch_size, 1), generator=generator)
    tokens = (starts + strides * torch.arange(SEQ_LEN + 1)) % VOCAB
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=batch_size, shuffle=False)


class TinyLM(pl.LightningModule):
    """A 2-layer transformer built in `configure_model`, with weights that depend only on `init_seed`."""

    def __init__(self, optimizer: str = "adamw", lr: float = 1e-2, scheduler: str | None = None,
                 optimizer_kwargs: dict[str, Any] | None = None, init_seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net: TinyGPT | None = None
        self.losses: list[float] = []

    def configure_model(self) -> None:
        if self.net is None:
            with torch.random.fork_rng():
                torch.manual_seed(self.hparams.init_seed)
                self.net = TinyGPT(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, max_seq_len=SEQ_LEN)

    def net_for_counting(self) -> TinyGPT:
        self.configure_model()
        return self.net

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        loss = F.cross_entropy(self(inputs).flatten(0, 1).float(), targets.flatten())
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        matrices = [p for name, p in self.named_parameters() if name.endswith("weight") and "norm" not in name]
        others = [p for name, p in self.named_parameters() if not (name.endswith("weight") and "norm" not in name)]
        groups = [{"params": matrices}, {"params": others, "weight_decay": 0.0, "lr": hp.lr / 2}]
        kwargs = dict(hp.optimizer_kwargs or {})
        if hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=hp.lr, **{"weight_decay": 0.05, **kwargs})
        elif hp.optimizer == "adam":
            optimizer = torch.optim.Adam(groups, lr=hp.lr, **kwargs)
        else:
            optimizer = torch.optim.SGD(groups, lr=hp.lr, **kwargs)
        if hp.scheduler is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": hp.scheduler}}


def fit(strategy: Any, num_batches: int = 8, precision: str = "32-true", module: TinyLM | None = None,
        ckpt_path: str | None = None, batch_size: int = BATCH, **trainer_kwargs: Any) -> tuple[TinyLM, pl.Trainer]:
    module = module or TinyLM()
    options = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False)
    options.update(trainer_kwargs)
    trainer = pl.Trainer(strategy=strategy, precision=precision, **options)
    trainer.fit(module, train_dataloaders=token_batches(num_batches, batch_size=batch_size), ckpt_path=ckpt_path)
    return module, trainer


def peak_and_final_allocated_bytes(run: Any) -> tuple[int, int]:
    """Host memory torch allocates while `run()` runs, at its peak and at the end, from the profiler's memory events
    (the CPU has no allocator statistics)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        run()
    changes = sorted((e.start_ns(), e.nbytes()) for e in profiler.profiler.kineto_results.events()
                     if e.name() == "[memory]")
    allocated = peak = 0
    for _, change in changes:
        allocated += change
        peak = max(peak, allocated)
    return peak, allocated


def in_a_fresh_process(module: str, call: str) -> Any:
    """`call` (an expression over the names of the test module `module` returning a JSON-able value) evaluated in a
    new Python process, which has imported nothing yet."""
    code = f"import json; from {module} import *; print('RESULT', json.dumps({call}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))
