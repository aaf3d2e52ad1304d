"""The Trainer's own features, each as one conformance case: Trainer flags, callbacks, the tuner, a second `fit`.

Every case trains the same small module (`FeatureModule`: the suite's tied Llama, with a validation loop, a
per-step LR schedule, `self.log(..., on_epoch=True)` and the `lr`/`batch_size` attributes the tuner looks for) and
records, besides each step's loss, everything the run logged (`MetricsHistory`), the number of optimizer steps and,
through `validate` and `predict` after `fit`, what its final weights compute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import (
    EarlyStopping,
    EMAWeightAveraging,
    GradientAccumulationScheduler,
    LearningRateMonitor,
    StochasticWeightAveraging,
)
from lightning.pytorch.loggers import Logger
from lightning.pytorch.tuner import Tuner
from lightning.pytorch.utilities import grad_norm
from torch.utils.data import DataLoader

from tests.conformance.modules import BATCH, _HuggingFaceModule, _llama, token_loader
from tests.conformance.runs import TELEMETRY_PREFIXES

LR = 1e-2
# Shorter than the suite's runs (the cases are many): 3 steps an epoch, an odd number for accumulation to end on.
FEATURE_OPTIONS = dict(limit_train_batches=3, limit_val_batches=1)


class FeatureModule(_HuggingFaceModule):
    """The suite's tied Llama as a user who turns the Trainer's features on would write it."""

    def __init__(self) -> None:
        super().__init__(lambda: _llama(tied=True, kv_heads=4))
        self.lr = LR
        self.batch_size = BATCH
        self.lr_scheduled = True

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.model(**self.batch_inputs(batch)).loss
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.model(**self.batch_inputs(batch)).loss)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch[0]).logits

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr)
        if not self.lr_scheduled:
            return optimizer
        # The lr halves every other step: a schedule the LR monitor and the engines' optimizers must both follow.
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        return token_loader(batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return token_loader(samples=2 * BATCH, shuffle=False)

    predict_dataloader = val_dataloader


class MetricsHistory(Logger):
    """A logger that keeps every `log_metrics` call (the strategy's own telemetry left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "history"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        kept = {k: float(v) for k, v in metrics.items() if not k.startswith(TELEMETRY_PREFIXES)}
        if kept:
            self.history.append((step, kept))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


class GradNormLogger(pl.Callback):
    """Logs the gradients' norms before each optimizer step, as Lightning's docs show (`grad_norm`)."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule, optimizer: Any) -> None:
        module.log_dict(grad_norm(module, norm_type=2))


class ZeroEmbeddingGradient(pl.Callback):
    """Changes gradients before each optimizer step (a user's own gradient surgery): the embedding's is zeroed, so
    only weight decay moves it. Adam would undo a mere rescaling."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule, optimizer: Any) -> None:
        embedding = module.model.get_input_embeddings().weight
        if embedding.grad is not None:
            embedding.grad.zero_()


def _fit_twice(trainer: pl.Trainer, module: pl.LightningModule) -> None:
    trainer.fit(module)
    trainer.fit_loop.max_epochs += 1
    trainer.fit(module)


def _fit_without_lr_scheduler(trainer: pl.Trainer, module: pl.LightningModule) -> None:
    module.lr_scheduled = False
    trainer.fit(module)


def _lr_find_then_fit(trainer: pl.Trainer, module: pl.LightningModule) -> None:
    finder = Tuner(trainer).lr_find(module, min_lr=1e-4, max_lr=1e-1, num_training=8, early_stop_threshold=None,
                                    update_attr=False)
    # The default suggestion skips the first 10 points: a short search needs its own bounds.
    module.lr = finder.suggestion(skip_begin=1, skip_end=1)
    trainer.fit(module)


def _scale_batch_size_then_fit(trainer: pl.Trainer, module: pl.LightningModule) -> None:
    Tuner(trainer).scale_batch_size(module, mode="power", steps_per_trial=1, init_val=8, max_trials=1)
    trainer.fit(module)


@dataclass(frozen=True)
class Feature:
    label: str
    """What the user turns on, as docs/conformance.md's table names it."""
    trainer_options: dict[str, Any] = field(default_factory=dict)
    callbacks: Callable[[], list[pl.Callback]] = list
    train: Callable[[pl.Trainer, pl.LightningModule], None] | None = None
    changes_the_run: bool = True
    """Whether the reference run differs from one without the feature (a feature that stops a run only after its
    duration cannot, in a run this short)."""


FEATURES: dict[str, Feature] = {
    "accumulate_grad_batches": Feature("`accumulate_grad_batches=2`", {"accumulate_grad_batches": 2}),
    "clip_norm": Feature("`gradient_clip_val` (norm)", {"gradient_clip_val": 0.1}),
    "clip_value": Feature("`gradient_clip_val` (`gradient_clip_algorithm='value'`)",
                          {"gradient_clip_val": 1e-3, "gradient_clip_algorithm": "value"}),
    "max_time": Feature("`max_time` (not reached)", {"max_time": {"minutes": 10}}, changes_the_run=False),
    "max_steps": Feature("`max_steps` within an epoch", {"max_steps": 3}),
    "val_check_interval": Feature("`val_check_interval=2`, `log_every_n_steps=1`",
                                  {"val_check_interval": 2, "log_every_n_steps": 1}),
    "check_val_every_n_epoch": Feature("`check_val_every_n_epoch=2` over 3 epochs",
                                       {"check_val_every_n_epoch": 2, "max_epochs": 3}),
    "fast_dev_run": Feature("`fast_dev_run=2`", {"fast_dev_run": 2}),
    "overfit_batches": Feature("`overfit_batches=2`", {"overfit_batches": 2}),
    "early_stopping": Feature("`EarlyStopping` on `val_loss`", {},
                              lambda: [EarlyStopping(monitor="val_loss", stopping_threshold=100.0)]),
    "lr_monitor": Feature("`LearningRateMonitor` (per step)", {"log_every_n_steps": 1},
                          lambda: [LearningRateMonitor(logging_interval="step")]),
    "lr_monitor_unscheduled": Feature("`LearningRateMonitor` (per step), no LR scheduler", {"log_every_n_steps": 1},
                                      lambda: [LearningRateMonitor(logging_interval="step")],
                                      train=_fit_without_lr_scheduler),
    "ema": Feature("`EMAWeightAveraging`", {}, lambda: [EMAWeightAveraging(decay=0.5)]),
    "swa": Feature("`StochasticWeightAveraging`", {"max_epochs": 3},
                   lambda: [StochasticWeightAveraging(swa_lrs=5e-3, swa_epoch_start=1, annealing_epochs=1)]),
    "accumulation_scheduler": Feature("`GradientAccumulationScheduler({1: 2})`", {},
                                      lambda: [GradientAccumulationScheduler({1: 2})]),
    "grad_norm_callback": Feature("callback logging `grad_norm` in `on_before_optimizer_step`",
                                  {"log_every_n_steps": 1}, lambda: [GradNormLogger()]),
    "gradient_transform_callback": Feature("callback changing gradients in `on_before_optimizer_step`", {},
                                           lambda: [ZeroEmbeddingGradient()]),
    "lr_find": Feature("`Tuner.lr_find`, then `fit`", {}, train=_lr_find_then_fit),
    "scale_batch_size": Feature("`Tuner.scale_batch_size`, then `fit`", {}, train=_scale_batch_size_then_fit),
    "fit_twice": Feature("`fit` twice on one Trainer (one more epoch)", {}, train=_fit_twice),
}
