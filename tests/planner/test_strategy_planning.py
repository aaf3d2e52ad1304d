"""`single_gpu_offload` plans at setup: auto picks a backend, a pinned one is checked, nothing fits -> refused early."""

from __future__ import annotations

import dataclasses
from importlib import import_module
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_offload import SingleGPUOffloadStrategy
from lightning_offload.activation_checkpointing import find_blocks, is_checkpointed, recompute_in_backward
from lightning_offload.planner import GIB, SAFETY_MARGIN, Machine, PlanDoesNotFit, estimate_memory
from tests.conftest import VOCAB, TinyLM, fit, token_batches


def test_auto_plans_from_the_first_batch_and_trains_on_the_cpu() -> None:
    module, trainer = fit("single_gpu_offload", num_batches=4)
    strategy = trainer.strategy
    report = strategy.plan_report
    assert report is not None and report.chosen is not None
    # On the CPU every tier is host memory: nothing is gained by offloading, so nothing is offloaded.
    assert strategy.backend_name == "device" == report.chosen.plan.backend
    assert report.stats.tokens == 4 * 16 and report.stats.blocks == 2
    assert report.stats.parameters == sum(p.numel() for p in module.parameters())
    assert strategy.activation_checkpointing.policy == report.chosen.plan.checkpointing
    assert module.losses[-1] < module.losses[0]


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_the_plan_knows_the_run_s_precision_and_whether_the_engine_builds_the_model(precision: str) -> None:
    _, trainer = fit("single_gpu_offload", num_batches=1, precision=precision)
    stats = trainer.strategy.plan_report.stats
    # TinyLM builds its layers in `configure_model`, inside the engine's build context.
    assert stats.precision == precision and stats.built_at_setup
    built = TinyLM()
    built.configure_model()
    _, trainer = fit("single_gpu_offload", num_batches=1, precision=precision, module=built)
    assert not trainer.strategy.plan_report.stats.built_at_setup


def test_pinned_levers_are_kept_by_the_plan() -> None:
    _, trainer = fit(SingleGPUOffloadStrategy(activation_checkpointing="full"), num_batches=2)
    assert trainer.strategy.activation_checkpointing.policy == "full"
    assert {c.plan.checkpointing for c in trainer.strategy.plan_report.candidates} == {"full"}


@pytest.mark.parametrize("policy", ["auto", "first_n"])
def test_blocks_are_checkpointed_from_the_first_as_many_as_memory_needs(monkeypatch, policy: str) -> None:
    _, measured = fit(SingleGPUOffloadStrategy(backend="device", activation_checkpointing="none"), num_batches=1)
    stats, planned = measured.strategy.plan_report.stats, measured.strategy.plan

    def total_gib(first_n: int) -> float:
        memory = estimate_memory(stats, dataclasses.replace(planned, checkpointing="first_n", first_n=first_n))
        return (memory.gpu_bytes + memory.host_bytes) / GIB

    # Room for the first block checkpointed, not for none of them.
    gib = (total_gib(1) + total_gib(0)) / 2 / SAFETY_MARGIN
    card = Machine(gpu_memory_gib=gib, host_memory_gib=gib, unified=True)
    monkeypatch.setattr(Machine, "detect", classmethod(lambda cls, device=None, **budgets: card))
    module, trainer = fit(SingleGPUOffloadStrategy(backend="device", activation_checkpointing=policy), num_batches=2)
    assert trainer.strategy.plan.first_n == trainer.strategy.activation_checkpointing.first_n == 1
    blocks = find_blocks(module)
    assert [is_checkpointed(block) for block in blocks] == [True] + [False] * (len(blocks) - 1)


def test_a_plan_that_cannot_fit_is_refused_before_the_model_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = Machine(gpu_memory_gib=0.01, host_memory_gib=0.01, unified=True)
    monkeypatch.setattr(Machine, "detect", classmethod(lambda cls, device=None, **budgets: tiny))
    module = TinyLM()
    with pytest.raises(PlanDoesNotFit, match=r"host RAM short by \d+\.\d GiB"):
        fit(SingleGPUOffloadStrategy(backend="deepspeed"), module=module, num_batches=2)
    assert module.net is None


def test_a_fit_retried_after_its_plan_was_refused_plans_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # A notebook: the first fit is refused, the user frees memory (here: the machine grows) and runs the cell again.
    detect = Machine.detect
    monkeypatch.setattr(Machine, "detect", classmethod(
        lambda cls, device=None, **budgets: Machine(gpu_memory_gib=0.01, host_memory_gib=0.01, unified=True)))
    module = TinyLM()
    trainer = pl.Trainer(strategy=SingleGPUOffloadStrategy(), accelerator="cpu", devices=1, max_steps=2,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with pytest.raises(PlanDoesNotFit):
        trainer.fit(module, train_dataloaders=token_batches(2))
    monkeypatch.setattr(Machine, "detect", detect)
    trainer.fit(module, train_dataloaders=token_batches(2))
    assert trainer.global_step == 2 and trainer.strategy.plan is not None


def test_a_pinned_backend_takes_the_planners_eight_bit_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    # At 30K parameters bitsandbytes' per-parameter temporaries outweigh the 6 bytes/param its state saves.
    monkeypatch.setattr("lightning_offload.backends.fsdp.HOST_EIGHT_BIT_UPDATE_BYTES_PER_ELEMENT", 0)
    _, roomy = fit(SingleGPUOffloadStrategy(backend="fsdp", activation_checkpointing="none"), num_batches=1)
    needs = {c.plan.optimizer: c.memory.gpu_bytes + c.memory.host_bytes for c in roomy.strategy.plan_report.candidates}
    assert needs["adamw8bit"] < needs["adamw"]
    # A host where the 8-bit plan fits and the fp32 one does not (the planner keeps 10% free).
    between = (needs["adamw8bit"] + needs["adamw"]) / 2 / 0.9 / 2**30
    machine = Machine(gpu_memory_gib=between, host_memory_gib=between, unified=True)
    monkeypatch.setattr(Machine, "detect", classmethod(lambda cls, device=None, **budgets: machine))
    _, trainer = fit(SingleGPUOffloadStrategy(backend="fsdp", activation_checkpointing="none"), num_batches=2)
    assert trainer.strategy.plan_report.chosen.plan.optimizer == "adamw8bit"
    assert type(trainer.optimizers[0]).__name__ == "AdamW8bit"


def test_backend_options_need_a_pinned_backend() -> None:
    with pytest.raises(ValueError, match="backend='deepspeed'"):
        SingleGPUOffloadStrategy(offload_optimizer=False)


class OpaqueLM(TinyLM):
    def forward(self, tokens):
        if tokens.is_meta:
            raise NotImplementedError("data-dependent control flow")
        return super().forward(tokens)


def test_a_model_the_meta_device_cannot_run_is_planned_from_an_estimate_and_says_so() -> None:
    from lightning_offload.planner.fallback import UNMEASURED_MARGIN

    with pytest.warns(UserWarning, match=r"No measured memory check ran: OpaqueLM's forward cannot run on the meta "
                                         r"device \(NotImplementedError: data-dependent control flow\)"):
        module, trainer = fit("single_gpu_offload", module=OpaqueLM(), num_batches=2)
    report = trainer.strategy.plan_report
    assert report.stats.parameters == sum(p.numel() for p in module.parameters()) and report.stats.tokens == 4 * 16
    assert report.reason.startswith("No measured memory check ran")
    # Only one block's estimated activations count in full, and the plan keeps 20% of memory free, not 10%.
    assert {c.plan.checkpointing for c in report.candidates} == {"full"}
    assert trainer.strategy.activation_checkpointing.policy == "full"
    chosen = report.chosen.memory
    assert chosen.gpu_bytes + chosen.host_bytes <= UNMEASURED_MARGIN * report.machine.host_memory_gib * 2**30


def test_a_budget_too_small_for_the_estimate_is_refused_before_training(monkeypatch) -> None:
    _, roomy = fit("single_gpu_offload", module=OpaqueLM(), num_batches=1)
    needs = min(c.memory.gpu_bytes + c.memory.host_bytes for c in roomy.strategy.plan_report.candidates)
    # Room for the smallest plan with 10% kept free (a measured plan's margin), not with the estimate's 20%.
    machine = Machine(gpu_memory_gib=needs / 0.85 / 2**30, host_memory_gib=needs / 0.85 / 2**30, unified=True)
    monkeypatch.setattr(Machine, "detect", classmethod(lambda cls, device=None, **budgets: machine))
    module = OpaqueLM()
    with pytest.raises(PlanDoesNotFit, match="No plan fits"):
        fit("single_gpu_offload", module=module, num_batches=2)
    assert module.losses == []


def test_checkpoints_that_cannot_fit_the_disk_are_refused_before_training(monkeypatch, tmp_path) -> None:
    import shutil
    from collections import namedtuple

    from lightning.pytorch.callbacks import ModelCheckpoint

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6, 1000))
    module = TinyLM()
    with pytest.raises(ValueError, match=r"would need 2 x .* GiB .* 0\.0 GiB free.*save_top_k=1"):
        fit("single_gpu_offload", module=module, num_batches=2, enable_checkpointing=True,
            callbacks=[ModelCheckpoint(dirpath=tmp_path)])
    assert module.net is None and not list(tmp_path.iterdir())


class SelfCheckpointingLM(TinyLM):
    """Every block recomputes itself, as `transformers`' `gradient_checkpointing_enable()` makes a model do."""

    def configure_model(self) -> None:
        super().configure_model()
        for block in self.net.blocks:
            recompute_in_backward(block)


def test_a_model_that_checkpoints_its_blocks_is_planned_as_fully_checkpointed() -> None:
    # The policies leave such blocks alone, so a plan counted with `offload` or `none` would not be what runs.
    _, trainer = fit("single_gpu_offload", module=SelfCheckpointingLM(), num_batches=2)
    assert {c.plan.checkpointing for c in trainer.strategy.plan_report.candidates} == {"full"}
    with pytest.warns(UserWarning, match=r"`activation_checkpointing='offload'` does not apply: every block of "
                                         r"SelfCheckpointingLM already checkpoints itself"):
        fit(SingleGPUOffloadStrategy(activation_checkpointing="offload"), module=SelfCheckpointingLM(), num_batches=2)


def test_compiled_blocks_are_costed_as_compiled() -> None:
    from lightning_offload.planner.cost import COMPILED_BLOCK_TIME

    _, eager = fit(SingleGPUOffloadStrategy(), num_batches=2)
    _, compiled = fit(SingleGPUOffloadStrategy(compile_blocks=True), num_batches=2)
    eager_report, compiled_report = eager.strategy.plan_report, compiled.strategy.plan_report
    assert compiled_report.stats.compiled_blocks and not eager_report.stats.compiled_blocks
    assert compiled_report.chosen.plan == eager_report.chosen.plan
    assert compiled_report.chosen.step_time.compute == pytest.approx(
        COMPILED_BLOCK_TIME * eager_report.chosen.step_time.compute)


class PretrainedLM(TinyLM):
    """Fine-tunes a checkpoint that `configure_model` loads with `from_pretrained`, which refuses a meta context."""

    def __init__(self, checkpoint: str) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        self.builds_in_host_memory = 0
        self.steps = 0

    def configure_model(self) -> None:
        from transformers import AutoModelForCausalLM

        if self.net is None:
            self.net = AutoModelForCausalLM.from_pretrained(self.checkpoint, dtype=torch.float32)
            self.builds_in_host_memory += 1

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens).logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps += not batch[0].is_meta  # the planner measures the step on meta tensors
        return super().training_step(batch, batch_idx)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("pretrained")
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def test_a_model_loaded_with_from_pretrained_is_built_in_host_memory_once_and_planned_from_it(pretrained) -> None:
    module, trainer = fit("single_gpu_offload", module=PretrainedLM(pretrained), num_batches=2)
    report = trainer.strategy.plan_report
    assert report is not None and report.chosen is not None
    assert "No measured memory check" not in report.reason  # measured: the built model runs on meta twins
    assert report.stats.parameters == sum(p.numel() for p in module.parameters()) and report.stats.blocks == 2
    assert module.builds_in_host_memory == 1 and module.steps == 2


def test_a_checkpoint_too_large_for_host_memory_is_refused_before_it_is_read(monkeypatch, pretrained) -> None:
    small_host = Machine(gpu_memory_gib=80, host_memory_gib=1e-5)
    monkeypatch.setattr(Machine, "detect", classmethod(lambda cls, device=None, **budgets: small_host))
    module = PretrainedLM(pretrained)
    with pytest.raises(PlanDoesNotFit, match=r"building it in host memory would need 0\.0 GiB for the 0\.0\dM "
                                             r"parameters .*from_config"):
        fit("single_gpu_offload", module=module, num_batches=2)
    assert module.net is None and module.builds_in_host_memory == 0


def test_a_budget_too_small_for_the_built_model_is_refused_before_training(monkeypatch, pretrained) -> None:
    # Room in host memory for the checkpoint, not on the (faked) GPU for any plan of it.
    small_card = Machine(gpu_memory_gib=1e-4, host_memory_gib=1)
    monkeypatch.setattr(Machine, "detect", classmethod(lambda cls, device=None, **budgets: small_card))
    module = PretrainedLM(pretrained)
    with pytest.raises(PlanDoesNotFit, match=r"No plan fits .* for 0\.0\dM parameters"):
        fit("single_gpu_offload", module=module, num_batches=2)
    assert module.builds_in_host_memory == 1 and module.steps == 0
    assert all(p.device.type == "cpu" for p in module.parameters())


@pytest.mark.parametrize("backend", ["device", "deepspeed", "fsdp", "gpu_8bit", "host_adam", "stream"])
def test_every_backend_trains_a_model_built_in_host_memory_from_its_loaded_weights(pretrained, backend) -> None:
    from transformers import AutoModelForCausalLM

    from tests.conftest import token_batches

    inputs, targets = next(iter(token_batches(2)))
    loaded = AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch.float32)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(loaded(inputs).logits.flatten(0, 1), targets.flatten()).item()
    torch_linear = torch.nn.functional.linear
    module, trainer = fit(SingleGPUOffloadStrategy(backend=backend), module=PretrainedLM(pretrained), num_batches=2)
    assert trainer.strategy.plan_report.chosen.plan.backend == backend and module.steps == 2
    # ZeRO-3 partitions a model built outside zero.Init by swapping torch's linear too: put back at teardown.
    assert torch.nn.functional.linear is torch_linear
    # The first step ran on the checkpoint's weights: no engine re-initialised or lost them.
    assert module.losses[0] == pytest.approx(expected, rel=1e-6)


def test_building_first_fetches_the_first_batch_no_more_often_than_planning_before_the_build(pretrained) -> None:
    import lightning.pytorch as pl

    from tests.conftest import token_batches

    def counting(cls: type) -> type:
        class Counting(cls):
            loaders = 0

            def train_dataloader(self):
                self.loaders += 1
                return token_batches(2)

        return Counting

    planned_before, built_first = counting(TinyLM)(), counting(PretrainedLM)(pretrained)
    for module in (planned_before, built_first):
        pl.Trainer(strategy="single_gpu_offload", accelerator="cpu", devices=1, max_epochs=1, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False).fit(module)
    assert built_first.builds_in_host_memory == 1 and built_first.steps == 2
    assert built_first.loaders == planned_before.loaders


def prefer(monkeypatch: pytest.MonkeyPatch, *backends: str) -> None:
    """A machine where every plan fits and the planner ranks `backends`' plans fastest, in that order: what
    `backend="auto"` takes on a GPU machine where they win (on the CPU nothing offloaded wins)."""
    choose = import_module("lightning_offload.planner.choose")  # the package's `choose` is the function

    roomy = Machine(gpu_memory_gib=1000, host_memory_gib=1000)
    monkeypatch.setattr(Machine, "detect", classmethod(lambda cls, device=None, **budgets: roomy))
    estimate = choose.estimate_step_time

    def ranked(stats, plan, ceilings, **options):
        step = estimate(stats, plan, ceilings, **options)
        rank = backends.index(plan.backend) if plan.backend in backends else len(backends)
        return dataclasses.replace(step, total=step.total + 1000.0 * rank)

    monkeypatch.setattr(choose, "estimate_step_time", ranked)


class LogsGradNorm(TinyLM):
    """The common pattern: the gradients' norm, logged before each optimizer step."""

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        from lightning.pytorch.utilities import grad_norm

        self.log_dict(grad_norm(self, norm_type=2))


def _ema() -> list[Any]:
    from lightning.pytorch.callbacks import EMAWeightAveraging

    return [EMAWeightAveraging(decay=0.5)]


# (what the run uses, the module, Trainer options, the backends that cannot run it, ranked fastest first)
NEEDS = {
    "gradient hook": (LogsGradNorm, {}, ("host_adam", "stream", "deepspeed")),
    "clipping by norm": (TinyLM, {"gradient_clip_val": 0.5}, ("stream",)),
    "clipping by value": (TinyLM, {"gradient_clip_val": 0.5, "gradient_clip_algorithm": "value"},
                          ("stream", "deepspeed")),
    "weight averaging": (TinyLM, {"callbacks": _ema}, ("deepspeed", "fsdp")),
}


@pytest.mark.parametrize("need", list(NEEDS))
def test_auto_plans_a_backend_that_runs_what_the_run_uses(monkeypatch: pytest.MonkeyPatch, need: str) -> None:
    build, options, refusing = NEEDS[need]
    prefer(monkeypatch, *refusing, "device")
    options = {key: value() if callable(value) else value for key, value in options.items()}
    module, trainer = fit(SingleGPUOffloadStrategy(), module=build(), num_batches=2, **options)
    report = trainer.strategy.plan_report
    assert trainer.strategy.backend_name == report.chosen.plan.backend == "device"
    assert trainer.global_step == 2 and len(module.losses) == 2
    assert set(refusing) <= set(report.left_out)
    assert {c.plan.backend for c in report.candidates}.isdisjoint(refusing)
    for backend in refusing:
        assert f"`{backend}`: it cannot run" in report.table()


def test_the_table_says_why_a_backend_was_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    prefer(monkeypatch, "host_adam", "device")
    _, trainer = fit(SingleGPUOffloadStrategy(), module=LogsGradNorm(), num_batches=1)
    assert ("`host_adam`: it cannot run `LogsGradNorm`'s `on_before_optimizer_step`, which reads the gradients "
            "before the step") in trainer.strategy.plan_report.table()


@pytest.mark.parametrize("need", list(NEEDS))
def test_a_pinned_backend_that_cannot_run_it_is_refused_before_the_model_is_built(need: str) -> None:
    build, options, refusing = NEEDS[need]
    options = {key: value() if callable(value) else value for key, value in options.items()}
    module = build()
    with pytest.raises(ValueError, match=f"{refusing[0]!r}"):
        fit(SingleGPUOffloadStrategy(backend=refusing[0]), module=module, num_batches=1, **options)
    # Weight averaging's own `setup` builds the model (`configure_model`) to copy it, before any strategy hook.
    assert module.net is None or need == "weight averaging"
    assert module.losses == []


class ReadsGradients:
    """A callback that reads the gradients before each optimizer step (adds a gradient hook to a later fit)."""

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        assert all(p.grad is not None for p in module.parameters() if p.requires_grad)


def _reads_gradients() -> list[Any]:
    from lightning.pytorch.callbacks import Callback

    return [type("ReadsGradients", (ReadsGradients, Callback), {})()]


# (what a later fit of the same Trainer adds, as Trainer attributes; a backend that cannot run it)
LATER_NEEDS = {
    "gradient hook": ({"callbacks": _reads_gradients}, "host_adam"),
    "clipping by value": ({"gradient_clip_val": 0.5, "gradient_clip_algorithm": "value"}, "deepspeed"),
    "weight averaging": ({"callbacks": _ema}, "fsdp"),
}


def fit_again_adding(trainer: Any, module: TinyLM, need: str) -> None:
    """A second `trainer.fit` of `module` (one more epoch) after the run starts using `need` (a notebook's next
    cell)."""
    added, _ = LATER_NEEDS[need]
    for name, value in added.items():
        if name == "callbacks":
            trainer.callbacks.extend(value())
        else:
            setattr(trainer, name, value)
    trainer.fit_loop.max_epochs += 1
    trainer.fit(module, train_dataloaders=token_batches(1))


@pytest.mark.parametrize("need", list(LATER_NEEDS))
def test_a_later_fit_that_adds_what_the_planned_backend_cannot_run_is_refused_before_it_starts(
        monkeypatch: pytest.MonkeyPatch, need: str) -> None:
    refusing = LATER_NEEDS[need][1]
    prefer(monkeypatch, refusing, "device")
    module, trainer = fit(SingleGPUOffloadStrategy(), num_batches=1)
    assert trainer.strategy.backend_name == refusing
    with pytest.raises(ValueError, match=r"`backend='auto'` chose .* first fit") as refusal:
        fit_again_adding(trainer, module, need)
    assert f"backend {refusing!r} cannot run" in str(refusal.value)
    assert "'device'" in str(refusal.value)  # a backend that runs it, to pin
    assert len(module.losses) == 1


@pytest.mark.parametrize("need", list(LATER_NEEDS))
def test_a_pinned_backend_refuses_a_later_fit_that_adds_what_it_cannot_run(need: str) -> None:
    refusing = LATER_NEEDS[need][1]
    module, trainer = fit(SingleGPUOffloadStrategy(backend=refusing), num_batches=1)
    with pytest.raises(ValueError, match=f"backend {refusing!r}|the {refusing!r} backend"):
        fit_again_adding(trainer, module, need)
    assert len(module.losses) == 1


def test_auto_resumes_lightnings_file_with_a_backend_that_saves_that_file(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path) -> None:
    # A checkpoint of a plain Lightning run (no plan in it): the engines that save folders cannot resume it.
    _, first = fit("auto", num_batches=4, max_steps=2)
    checkpoint = tmp_path / "plain.ckpt"
    first.save_checkpoint(checkpoint)
    folder_backends = ("host_adam", "stream", "deepspeed")
    prefer(monkeypatch, *folder_backends, "device")
    _, trainer = fit(SingleGPUOffloadStrategy(), num_batches=4, max_steps=4, max_epochs=3,
                     ckpt_path=str(checkpoint))
    report = trainer.strategy.plan_report
    assert trainer.strategy.backend_name == report.chosen.plan.backend == "device"
    assert trainer.global_step == 4
    assert set(folder_backends) <= set(report.left_out)
    assert "resuming Lightning's checkpoint file" in report.table()
