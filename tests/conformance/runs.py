"""One seeded run of a conformance module under a strategy, and what it produced."""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden

import lightning_offload
from lightning_offload import SingleGPUOffloadStrategy
from tests.conformance.modules import KINDS

SEED = 0
TRAINER_OPTIONS = dict(devices=1, max_epochs=2, limit_train_batches=4, limit_val_batches=2, limit_test_batches=2,
                       limit_predict_batches=2, num_sanity_val_steps=1, logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False)
# Errors that refuse a run with a message of ours; anything else, or one raised inside a library, is a failure.
REFUSALS = (ValueError, TypeError, NotImplementedError)
TELEMETRY_PREFIXES = ("perf/", "mem/", "pcie/")
PACKAGE = str(Path(lightning_offload.__file__).parent)


@dataclass
class Run:
    losses: list[float] = field(default_factory=list)
    """The loss of every training step, as `on_train_batch_end` sees it."""
    metrics: dict[str, float] = field(default_factory=dict)
    """What `fit`, `validate` and `test` logged, by name (the latter two prefixed)."""
    predictions: list[torch.Tensor] = field(default_factory=list)
    refusal: str | None = None
    """The message of a run refused at setup, before any step."""
    optimizer_steps: int = 0
    """The Trainer's `global_step` when the run ends."""


class _RecordLosses(pl.Callback):
    def __init__(self, run: Run) -> None:
        self.run = run

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.run.losses.append(loss.item())


def run(kind: str, strategy: Any = "auto", precision: str = "32-true", accelerator: str = "cpu",
        build: Callable[[], pl.LightningModule] | None = None, trainer_options: dict[str, Any] | None = None,
        callbacks: Sequence[pl.Callback] = (), train: Callable[[pl.Trainer, pl.LightningModule], None] | None = None,
        ) -> Run:
    """Seeds everything, builds the module (`build`, else the kind's factory), trains it (`train`, else `fit`) with
    the suite's Trainer options (`trainer_options` override them) and validates, tests and predicts where the module
    has the loops (`predict` with Lightning's default step where the module has none)."""
    result = Run()
    pl.seed_everything(SEED, verbose=False)
    module = (build or KINDS[kind])()
    options = {**TRAINER_OPTIONS, **(trainer_options or {})}
    trainer = pl.Trainer(strategy=strategy, precision=precision, accelerator=accelerator,
                         callbacks=[_RecordLosses(result), *callbacks], **options)
    try:
        (train or pl.Trainer.fit)(trainer, module)
    except REFUSALS as error:
        if result.losses or not _raised_by_the_strategy(error):
            raise
        result.refusal = str(error)
        return result
    result.optimizer_steps = trainer.global_step
    # The strategy's telemetry logs its own figures; the user's metrics are what is compared.
    result.metrics = {name: value.item() for name, value in trainer.callback_metrics.items()
                      if not name.startswith(TELEMETRY_PREFIXES)}
    if is_overridden("validation_step", module):
        for stage, evaluate, step in (("validate", trainer.validate, "validation_step"),
                                      ("test", trainer.test, "test_step")):
            if is_overridden(step, module):
                for name, value in evaluate(module, verbose=False)[0].items():
                    result.metrics[f"{stage}/{name}"] = value
        result.predictions = [p.detach().cpu() for p in trainer.predict(module)]
    return result


def _raised_by_the_strategy(error: BaseException) -> bool:
    """Whether the innermost frame that raised `error` is this package's: a refusal, not a library's traceback."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and frames[-1].filename.startswith(PACKAGE)


def strategies() -> dict[str, Callable[[], Any]]:
    """The backends that run on the CPU, by name; each a factory of a fresh strategy."""
    return {
        "device": lambda: SingleGPUOffloadStrategy(backend="device"),
        "host_adam": lambda: SingleGPUOffloadStrategy(backend="host_adam"),
        "deepspeed": lambda: SingleGPUOffloadStrategy(backend="deepspeed"),
        "fsdp": lambda: SingleGPUOffloadStrategy(backend="fsdp"),
        "gpu_8bit": lambda: SingleGPUOffloadStrategy(backend="gpu_8bit"),
        "stream": lambda: SingleGPUOffloadStrategy(backend="stream"),
    }
