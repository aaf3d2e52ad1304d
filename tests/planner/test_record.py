"""The chosen plan is part of the run: in the hyperparameters, in every checkpoint, and taken again on resume."""

from __future__ import annotations

import pytest
import yaml
from lightning.pytorch.loggers import CSVLogger

from lightning_offload import SingleGPUOffloadStrategy
from lightning_offload.planner import Machine, PlanDoesNotFit
from lightning_offload.planner.record import saved_plan
from tests.conftest import TinyLM, fit


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
