"""A later fit of a strategy that keeps its engine: what it adds is priced with the planner's memory terms within the
budget its first fit planned under, and refused before it starts when the kept plan no longer fits."""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning.pytorch as pl
import pytest
import torch.nn.functional as F

from lightning_offload import SingleGPUOffloadStrategy
from lightning_offload.backends.needs import RunNeeds
from lightning_offload.planner import GIB, SAFETY_MARGIN, Machine, PlanDoesNotFit, estimate_memory
from lightning_offload.planner.choose import scaled
from lightning_offload.planner.fallback import UNMEASURED_MARGIN
from lightning_offload.planner.refit import refuse_what_the_kept_plan_cannot_fit
from tests.conftest import BATCH, SEQ_LEN, TinyLM, token_batches
from tests.planner.test_strategy_planning import _reads_gradients, prefer

# The kept plan updates inside backward (no gradient buffer), at the precision it trains with.
KEPT, PRECISION = "gpu_8bit", "bf16-mixed"
# (what a later fit adds that keeps every gradient until the step, as Trainer attributes; how the planner prices it)
ADDED = {
    "clipping by norm": ({"gradient_clip_val": 0.5}, {"holds_gradients": True, "clipping": "norm"}),
    "clipping by value": ({"gradient_clip_val": 0.5, "gradient_clip_algorithm": "value"}, {"clipping": "value"}),
    "gradient hook": ({"callbacks": _reads_gradients}, {"holds_gradients": True}),
    "accumulation": ({"accumulate_grad_batches": 2}, {"accumulate": 2}),
}


class CountsHooks(TinyLM):
    """Counts the calls of the hooks a planner's measurement would call (outside its pre-flight, which puts them
    back)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = {"train_dataloader": 0, "configure_optimizers": 0, "training_step": 0}
        self.batch_size = BATCH

    def train_dataloader(self) -> Any:
        self.calls["train_dataloader"] += 1
        return token_batches(1, batch_size=self.batch_size)

    def configure_optimizers(self) -> Any:
        self.calls["configure_optimizers"] += 1
        return super().configure_optimizers()

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.calls["training_step"] += 1
        return super().training_step(batch, batch_idx)


def first_fit(monkeypatch: pytest.MonkeyPatch, gpu_gib: float = 1000) -> tuple[CountsHooks, pl.Trainer]:
    """One epoch under `backend="auto"`, which ranks the kept backend fastest, on a machine with `gpu_gib` of GPU."""
    prefer(monkeypatch, KEPT, "device")
    machine = Machine(gpu_memory_gib=gpu_gib, host_memory_gib=1000)
    monkeypatch.setattr(Machine, "detect", classmethod(lambda cls, device=None, **budgets: machine))
    module = CountsHooks()
    # 8-bit state pinned: the planner takes 8-bit plans only when asked to, or when no exact one fits.
    strategy = SingleGPUOffloadStrategy(optimizer="adamw8bit", activation_checkpointing="full")
    trainer = pl.Trainer(strategy=strategy, precision=PRECISION,
                         accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    assert trainer.strategy.plan.backend == KEPT
    return module, trainer


def between_gpu_gib(monkeypatch: pytest.MonkeyPatch, need: str) -> float:
    """GPU memory where the kept plan fits the first fit and not with what a later fit adds (10% kept free)."""
    _, trainer = first_fit(monkeypatch)
    report = trainer.strategy.plan_report
    plain = estimate_memory(report.stats, trainer.strategy.plan).gpu_bytes
    added = estimate_memory(report.stats, trainer.strategy.plan, **ADDED[need][1]).gpu_bytes
    assert added > plain
    return (plain + added) / 2 / SAFETY_MARGIN / GIB


def fit_again_adding(trainer: pl.Trainer, module: CountsHooks, need: str) -> None:
    """A second `trainer.fit` of `module` (one more epoch) after the run starts using `need`."""
    for name, value in ADDED[need][0].items():
        if name == "callbacks":
            trainer.callbacks.extend(value())
        else:
            setattr(trainer, name, value)
    trainer.fit_loop.max_epochs += 1
    trainer.fit(module)


@pytest.mark.parametrize("need", list(ADDED))
def test_a_later_fit_whose_additions_the_kept_plan_cannot_fit_is_refused_before_it_starts(
        monkeypatch: pytest.MonkeyPatch, need: str) -> None:
    module, trainer = first_fit(monkeypatch, between_gpu_gib(monkeypatch, need))
    steps, calls = trainer.global_step, dict(module.calls)
    with pytest.raises(PlanDoesNotFit, match=r"This fit adds .*plan this strategy chose when it first ran \(gpu_8bit .*GPU "
                                             r"short by \d+\.\d\d GiB.*Leave it out \(.*\), or train with a new "
                                             r"strategy") as refusal:
        fit_again_adding(trainer, module, need)
    assert {"clipping by norm": "`gradient_clip_val=0.5`", "clipping by value": "gradient_clip_algorithm='value'",
            "gradient hook": "`ReadsGradients`'s `on_before_optimizer_step`",
            "accumulation": "`accumulate_grad_batches=2` (when planned: 1)"}[need] in str(refusal.value)
    # Before any hook of the fit: no step, and not even its optimizer or data.
    assert trainer.global_step == steps and module.calls == calls


@pytest.mark.parametrize("need", ["clipping by norm", "accumulation"])
def test_a_later_fit_whose_additions_fit_the_kept_plan_trains_without_planning_again(
        monkeypatch: pytest.MonkeyPatch, need: str) -> None:
    module, trainer = first_fit(monkeypatch)
    report, calls = trainer.strategy.plan_report, dict(module.calls)
    detected = []
    monkeypatch.setattr(Machine, "detect", classmethod(lambda cls, device=None, **budgets: detected.append(1)))
    fit_again_adding(trainer, module, need)
    assert trainer.strategy.plan_report is report and not detected
    # The hooks as a fit without the strategy's check calls them: once each, a step per batch.
    assert module.calls == {"train_dataloader": calls["train_dataloader"] + 1,
                            "configure_optimizers": calls["configure_optimizers"] + 1,
                            "training_step": calls["training_step"] + 1}


def test_a_later_fit_with_the_first_fits_needs_is_not_priced_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # The tightest GPU the first fit's plan fits: anything the planner priced again would have to fit it exactly.
    module, trainer = first_fit(monkeypatch, between_gpu_gib(monkeypatch, "clipping by norm"))
    priced = []
    choose = "lightning_offload.planner.refit.choose"
    monkeypatch.setattr(choose, lambda *args, **options: priced.append(1))
    calls = dict(module.calls)
    trainer.fit_loop.max_epochs += 1
    trainer.fit(module)
    assert not priced and trainer.current_epoch == 2
    assert module.calls == {name: count + 1 for name, count in calls.items()}


def between_batches_gpu_gib(monkeypatch: pytest.MonkeyPatch, growth: int) -> float:
    """GPU memory where the kept plan fits the first fit's batches and not batches `growth` times larger."""
    _, trainer = first_fit(monkeypatch)
    report, plan = trainer.strategy.plan_report, trainer.strategy.plan
    plain = estimate_memory(report.stats, plan).gpu_bytes
    larger = estimate_memory(scaled(report.stats, growth), plan).gpu_bytes
    assert larger > plain
    return (plain + larger) / 2 / SAFETY_MARGIN / GIB


def test_a_later_fit_on_larger_batches_than_the_kept_plan_fits_is_refused_before_its_first_step(
        monkeypatch: pytest.MonkeyPatch) -> None:
    module, trainer = first_fit(monkeypatch, between_batches_gpu_gib(monkeypatch, 2))
    steps, calls = trainer.global_step, dict(module.calls)
    module.batch_size = 2 * BATCH
    trainer.fit_loop.max_epochs += 1
    with pytest.raises(PlanDoesNotFit, match=rf"This fit adds batches 2x those it was planned for \({2 * BATCH * SEQ_LEN} "
                                             rf"elements in the first tensor, {BATCH * SEQ_LEN} then\).*GPU short by "
                                             r".*batches no larger than those"):
        trainer.fit(module)
    assert trainer.global_step == steps and module.calls["training_step"] == calls["training_step"]


def test_a_later_fit_on_larger_batches_that_fit_the_kept_plan_trains(monkeypatch: pytest.MonkeyPatch) -> None:
    module, trainer = first_fit(monkeypatch, 2 * between_batches_gpu_gib(monkeypatch, 2))
    module.batch_size = 2 * BATCH
    trainer.fit_loop.max_epochs += 1
    trainer.fit(module)
    assert trainer.current_epoch == 2 and module.calls["training_step"] == 2


def test_a_later_fit_is_priced_with_the_margin_its_plan_was_chosen_with(monkeypatch: pytest.MonkeyPatch) -> None:
    # A plan chosen from an estimate (the meta device could not run the model) keeps more of each tier free.
    _, trainer = first_fit(monkeypatch)
    report, plan = trainer.strategy.plan_report, trainer.strategy.plan
    clipped = estimate_memory(report.stats, plan, **ADDED["clipping by norm"][1]).gpu_bytes
    # Room for it with the measured plan's margin, not with the estimate's.
    gpu_gib = clipped / ((SAFETY_MARGIN + UNMEASURED_MARGIN) / 2) / GIB
    kept = dataclasses.replace(report, machine=Machine(gpu_memory_gib=gpu_gib, host_memory_gib=1000))
    clipping = RunNeeds(gradient_clip_val=0.5)
    refuse_what_the_kept_plan_cannot_fit(kept, plan, clipping, accumulate=1)
    with pytest.raises(PlanDoesNotFit, match=rf"{100 * (1 - UNMEASURED_MARGIN):.0f}% of each kept free"):
        refuse_what_the_kept_plan_cannot_fit(dataclasses.replace(kept, margin=UNMEASURED_MARGIN), plan, clipping,
                                             accumulate=1)


class EvaluatedFirst(CountsHooks):
    """CountsHooks with a validation loop of `BATCH`-sized batches, whatever size its training batches are."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, targets = batch
        self.log("val_loss", F.cross_entropy(self(inputs).flatten(0, 1).float(), targets.flatten()))

    def val_dataloader(self) -> Any:
        return token_batches(1, seed=1)


def validate_first(monkeypatch: pytest.MonkeyPatch, gpu_gib: float = 1000) -> tuple[EvaluatedFirst, pl.Trainer]:
    """`trainer.validate` under `backend="auto"` without a saved plan (it plans on the validation batch), as
    `first_fit` fits, on a machine with `gpu_gib` of GPU; the Trainer fits one epoch next."""
    prefer(monkeypatch, KEPT, "device")
    machine = Machine(gpu_memory_gib=gpu_gib, host_memory_gib=1000)
    monkeypatch.setattr(Machine, "detect", classmethod(lambda cls, device=None, **budgets: machine))
    module = EvaluatedFirst()
    strategy = SingleGPUOffloadStrategy(optimizer="adamw8bit", activation_checkpointing="full")
    trainer = pl.Trainer(strategy=strategy, precision=PRECISION, accelerator="cpu", devices=1, max_epochs=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.validate(module, verbose=False)
    assert trainer.strategy.plan.backend == KEPT and module.calls["training_step"] == 0
    return module, trainer


def between_evaluated_gpu_gib(monkeypatch: pytest.MonkeyPatch, **grown: Any) -> float:
    """GPU memory where the plan a validate chose fits its batch and not a fit with `grown` (`estimate_memory`'s
    options, or `growth`: batches that many times larger)."""
    _, trainer = validate_first(monkeypatch)
    report, plan = trainer.strategy.plan_report, trainer.strategy.plan
    plain = estimate_memory(report.stats, plan).gpu_bytes
    growth = grown.pop("growth", 1)
    larger = estimate_memory(scaled(report.stats, growth), plan, **grown).gpu_bytes
    assert larger > plain
    return (plain + larger) / 2 / SAFETY_MARGIN / GIB


def test_a_fit_after_a_validate_on_larger_batches_than_its_plan_fits_is_refused_before_its_first_step(
        monkeypatch: pytest.MonkeyPatch) -> None:
    module, trainer = validate_first(monkeypatch, between_evaluated_gpu_gib(monkeypatch, growth=2))
    module.batch_size = 2 * BATCH
    with pytest.raises(PlanDoesNotFit, match=rf"This fit adds batches 2x those it was planned for \({2 * BATCH * SEQ_LEN} "
                                             rf"elements in the first tensor, {BATCH * SEQ_LEN} then\).*GPU short by "):
        trainer.fit(module)
    assert trainer.global_step == 0 and module.calls["training_step"] == 0


def test_a_fit_after_a_validate_on_larger_batches_that_fit_its_plan_trains(monkeypatch: pytest.MonkeyPatch) -> None:
    module, trainer = validate_first(monkeypatch, 2 * between_evaluated_gpu_gib(monkeypatch, growth=2))
    report, calls = trainer.strategy.plan_report, dict(module.calls)
    module.batch_size = 2 * BATCH
    trainer.fit(module)
    assert trainer.strategy.plan_report is report and trainer.current_epoch == 1
    assert module.calls == {name: count + 1 for name, count in calls.items()}


def test_a_fit_after_a_validate_with_clipping_its_plan_cannot_fit_is_refused_before_it_starts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    options, priced = ADDED["clipping by norm"]
    module, trainer = validate_first(monkeypatch, between_evaluated_gpu_gib(monkeypatch, **priced))
    calls = dict(module.calls)
    trainer.gradient_clip_val = options["gradient_clip_val"]
    with pytest.raises(PlanDoesNotFit, match=r"This fit adds gradient clipping by norm.*GPU short by"):
        trainer.fit(module)
    assert trainer.global_step == 0 and module.calls == calls


def test_across_processes_the_refusal_of_the_rank_holding_the_report_is_raised_on_every_rank(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Rank 0 alone holds the plan report: it broadcasts what it found, and a rank without the report raises that.
    module, trainer = first_fit(monkeypatch, between_gpu_gib(monkeypatch, "clipping by norm"))
    strategy, steps = trainer.strategy, trainer.global_step
    sent = []
    monkeypatch.setattr(strategy, "broadcast", lambda obj, src=0: sent.append(obj) or obj)
    with pytest.raises(PlanDoesNotFit):
        fit_again_adding(trainer, module, "clipping by norm")
    [found] = sent
    assert found.startswith("This fit adds gradient clipping by norm (`gradient_clip_val=0.5`)")

    strategy.plan_report = None  # as on rank 1
    monkeypatch.setattr(strategy, "broadcast", lambda obj, src=0: found)
    trainer.fit_loop.max_epochs += 1
    with pytest.raises(PlanDoesNotFit) as refusal:
        trainer.fit(module)
    assert str(refusal.value) == found
    assert trainer.global_step == steps

    monkeypatch.setattr(strategy, "broadcast", lambda obj, src=0: None)  # rank 0 found it fits
    trainer.fit(module)
    assert trainer.global_step > steps
