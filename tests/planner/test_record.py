"""The chosen plan is part of the run: in the hyperparameters, in every checkpoint, and taken again on resume."""

from __future__ import annotations

from importlib import import_module
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_offload import SingleGPUOffloadStrategy
from lightning_offload.activation_checkpointing import find_blocks, is_checkpointed
from lightning_offload.planner import Machine, PlanDoesNotFit
from lightning_offload.planner.record import saved_plan
from tests.conftest import TinyLM, fit, token_batches


def test_the_chosen_plan_is_logged_with_the_hyperparameters(tmp_path) -> None:
    _, trainer = fit(SingleGPUOffloadStrategy(), num_batches=1, logger=CSVLogger(tmp_path, name="run"))
    chosen = trainer.strategy.plan_report.chosen
    hparams = yaml.safe_load((tmp_path / "run" / "version_0" / "hparams.yaml").read_text())
    assert hparams["plan"] == str(chosen.plan)
    assert hparams["plan/backend"] == chosen.plan.backend and hparams["plan/checkpointing"] == chosen.plan.checkpointing
    assert hparams["plan/step_s"] == pytest.approx(chosen.step_time_s)
    assert hparams["lr"] == TinyLM().hparams.lr  # the module's own hyperparameters are still there


# A Lightning file, and each backend's own folder (the plan in a file of its own, nested, or among DeepSpeed's).
@pytest.mark.parametrize("backend", ["fsdp", "stream", "host_adam", "deepspeed"])
def test_each_checkpoint_holds_the_plan_it_was_trained_with(tmp_path, backend) -> None:
    _, trainer = fit(SingleGPUOffloadStrategy(backend=backend), num_batches=2)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    assert trainer.strategy.plan is not None and trainer.strategy.plan.backend == backend
    assert saved_plan(tmp_path / "last.ckpt") == trainer.strategy.plan


def test_auto_resumes_with_the_checkpoints_plan_not_a_new_one(tmp_path) -> None:
    _, first = fit(SingleGPUOffloadStrategy(backend="fsdp"), num_batches=2)
    first.save_checkpoint(tmp_path / "epoch1.ckpt")
    _, fresh = fit(SingleGPUOffloadStrategy(), num_batches=2)
    assert fresh.strategy.plan.backend != "fsdp"  # what `auto` would choose for a new run
    module, resumed = fit(SingleGPUOffloadStrategy(), num_batches=2, max_epochs=2,
                          ckpt_path=str(tmp_path / "epoch1.ckpt"))
    assert resumed.strategy.plan == first.strategy.plan and resumed.strategy.backend_name == "fsdp"
    assert "Resuming" in resumed.strategy.plan_report.reason
    assert resumed.global_step == 2 * first.global_step and len(module.losses) == 2  # the second epoch only


# `auto`, or `first_n` with the count left to the planner: either takes the checkpoint's count.
@pytest.mark.parametrize("policy", [None, "first_n"])
def test_a_resumed_run_checkpoints_the_same_blocks_as_the_run_it_resumes(tmp_path, policy) -> None:
    first_block = {"policy": "first_n", "first_n": 1}
    _, first = fit(SingleGPUOffloadStrategy(backend="device", activation_checkpointing=first_block), num_batches=2)
    first.save_checkpoint(tmp_path / "epoch1.ckpt")
    assert saved_plan(tmp_path / "epoch1.ckpt") == first.strategy.plan
    _, fresh = fit(SingleGPUOffloadStrategy(activation_checkpointing=policy), num_batches=2)
    assert fresh.strategy.plan.checkpointing != "first_n"  # what the planner would choose for a new run
    module, resumed = fit(SingleGPUOffloadStrategy(activation_checkpointing=policy), num_batches=2, max_epochs=2,
                          ckpt_path=str(tmp_path / "epoch1.ckpt"))
    assert resumed.strategy.plan == first.strategy.plan and resumed.strategy.plan.first_n == 1
    blocks = find_blocks(module)
    assert [is_checkpointed(block) for block in blocks] == [True] + [False] * (len(blocks) - 1)


def test_a_checkpoints_plan_that_no_longer_fits_is_refused_by_name(tmp_path, monkeypatch) -> None:
    _, first = fit(SingleGPUOffloadStrategy(backend="fsdp"), num_batches=2)
    first.save_checkpoint(tmp_path / "epoch1.ckpt")
    tiny = Machine(gpu_memory_gib=0.01, host_memory_gib=0.01, unified=True)
    monkeypatch.setattr(Machine, "detect", classmethod(lambda cls, device=None, **budgets: tiny))
    module = TinyLM()
    with pytest.raises(PlanDoesNotFit, match=r"was trained with fsdp \+ .*, which no longer fits this machine .* "
                                              r"host RAM short by"):
        fit(SingleGPUOffloadStrategy(), module=module, num_batches=2, max_epochs=2,
            ckpt_path=str(tmp_path / "epoch1.ckpt"))
    assert module.net is None  # refused before the model was built


def test_a_pinned_backend_that_cannot_read_the_checkpoint_is_refused(tmp_path) -> None:
    _, first = fit(SingleGPUOffloadStrategy(backend="fsdp"), num_batches=2)
    first.save_checkpoint(tmp_path / "epoch1.ckpt")
    with pytest.raises(ValueError, match=r"was written by fsdp \+ .* Resume with `backend='auto'`"):
        fit(SingleGPUOffloadStrategy(backend="device"), num_batches=2, max_epochs=2,
            ckpt_path=str(tmp_path / "epoch1.ckpt"))


def small_regression(lightning: Any) -> Any:
    """A LightningModule of `lightning` (either namespace) built in `configure_model`, recording its losses."""

    class Regression(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net: torch.nn.Module | None = None
            self.losses: list[torch.Tensor] = []

        def configure_model(self) -> None:
            if self.net is None:
                self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.losses.append(loss.detach())
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    return Regression()


@pytest.mark.parametrize("namespace", ["lightning.pytorch", "pytorch_lightning"])
def test_auto_resumes_last_with_its_plan_under_either_lightning_namespace(namespace, tmp_path) -> None:
    lightning = pytest.importorskip(namespace)
    strategies = import_module("lightning_offload" if namespace == "lightning.pytorch"
                               else "lightning_offload.pytorch_lightning")
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)

    def run(backend: str, epochs: int, ckpt_path: str | None = None, folder: str = "unused") -> Any:
        module = small_regression(lightning)
        checkpoints = lightning.callbacks.ModelCheckpoint(dirpath=tmp_path / folder, save_last=True)
        trainer = lightning.Trainer(strategy=strategies.SingleGPUOffloadStrategy(backend=backend), accelerator="cpu",
                                    devices=1, max_epochs=epochs, logger=False, callbacks=[checkpoints],
                                    enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return module, trainer

    _, first = run("fsdp", 1, folder="checkpoints")
    _, fresh = run("auto", 1)
    assert fresh.strategy.plan.backend != "fsdp"  # what `auto` would choose for a new run
    # "last": Lightning finds the checkpoint in the callback's folder before it builds the model.
    module, resumed = run("auto", 2, ckpt_path="last", folder="checkpoints")
    assert resumed.strategy.plan == first.strategy.plan and resumed.strategy.backend_name == "fsdp"
    assert "Resuming" in resumed.strategy.plan_report.reason and "last" in resumed.strategy.plan_report.reason
    assert resumed.global_step == 2 * first.global_step and len(module.losses) == len(data)  # the second epoch


def test_the_path_given_to_fit_wins_over_one_set_on_the_trainer(tmp_path) -> None:
    _, first = fit(SingleGPUOffloadStrategy(backend="fsdp"), num_batches=2)
    first.save_checkpoint(tmp_path / "fsdp.ckpt")
    strategy = SingleGPUOffloadStrategy()
    module = TinyLM()
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_epochs=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.ckpt_path = str(tmp_path / "missing.ckpt")
    with pytest.warns(UserWarning, match="The latter will be loaded"):
        trainer.fit(module, token_batches(2), ckpt_path=str(tmp_path / "fsdp.ckpt"))
    assert strategy.plan == first.strategy.plan
