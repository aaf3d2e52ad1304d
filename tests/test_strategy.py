"""`single_gpu_offload` on the real DeepSpeed engine (CPU accelerator), against plain Lightning runs."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

import lightning_offload
from lightning_offload import SingleGPUOffloadStrategy
from lightning_offload import strategy as strategy_module
from lightning_offload.strategy import refuse_emulated_bf16
from tests.conftest import TinyLM, fit

# fp32 runs: DeepSpeed's CPU Adam and torch's AdamW round differently in the last bits, and the difference grows
# slowly over steps; 1e-3 relative per step holds with a wide margin yet catches any real mismatch (a dropped
# param group, a doubled loss scale, a missing clip), which moves losses by >1e-2 within a few steps.
FP32_RTOL = 1e-3
# On the CPU the same comparison holds far tighter: measured at most 3.5e-6 relative per step over 8 steps
# (tests/conformance).
CPU_ADAM_RTOL = 1e-5
# bf16 weights: each step's loss within 3% of the fp32 reference (measured: <1%).
BF16_RTOL = 3e-2


def assert_losses_close(actual: list[float], expected: list[float], rtol: float) -> None:
    assert len(actual) == len(expected) and actual
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected), rtol=rtol, atol=0.0)


def test_fp32_losses_track_plain_run() -> None:
    reference, _ = fit("auto")
    offloaded, _ = fit("single_gpu_offload_deepspeed")
    assert_losses_close(offloaded.losses, reference.losses, CPU_ADAM_RTOL)
    assert offloaded.losses[-1] < 0.9 * offloaded.losses[0]


def test_bf16_losses_track_fp32_plain_run() -> None:
    reference, _ = fit("auto")
    offloaded, _ = fit("single_gpu_offload_deepspeed", precision="bf16-mixed")
    assert_losses_close(offloaded.losses, reference.losses, BF16_RTOL)


def test_model_built_in_configure_model_is_partitioned() -> None:
    # Threshold 0: no parameter is small enough to stay whole on the device.
    module, trainer = fit(SingleGPUOffloadStrategy(backend="deepspeed", param_persistence_threshold=0), num_batches=1)
    weights = list(module.net.parameters())
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in weights)
    assert sum(p.ds_numel for p in weights) == sum(p.numel() for p in TinyLM().net_for_counting().parameters())


class InitialWeights(TinyLM):
    def on_train_start(self) -> None:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.parameters())):
            self.initial_weights = {name: p.detach().clone() for name, p in self.net.named_parameters()}


def test_bf16_partitions_start_from_the_weights_of_the_model_built_without_the_strategy() -> None:
    # zero.Init holds the parameters in bf16 while TinyGPT's `nn.init.normal_` runs: the draws are the fp32 ones.
    module, _ = fit("single_gpu_offload_deepspeed", precision="bf16-mixed", module=InitialWeights(), num_batches=1)
    plain = TinyLM().net_for_counting()
    assert module.initial_weights.keys() == dict(plain.named_parameters()).keys()
    for name, weight in plain.named_parameters():
        assert torch.equal(module.initial_weights[name], weight.detach().to(torch.bfloat16)), name


def test_adamw_hyperparameters_and_param_groups_reach_cpu_adam() -> None:
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    module = TinyLM(optimizer_kwargs={"betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.2})
    _, trainer = fit("single_gpu_offload_deepspeed", module=module, num_batches=1)
    engine_optimizer = trainer.strategy.optimizers[0].optimizer
    assert isinstance(engine_optimizer, DeepSpeedCPUAdam) and engine_optimizer.adam_w_mode
    groups = engine_optimizer.param_groups
    assert [(g["lr"], g["betas"], g["eps"], g["weight_decay"]) for g in groups] == [
        (1e-2, (0.8, 0.9), 1e-6, 0.2),
        (5e-3, (0.8, 0.9), 1e-6, 0.0),
    ]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_sgd_matches_plain_run(accumulate: int) -> None:
    options = dict(optimizer="sgd", lr=0.5, optimizer_kwargs={"momentum": 0.9})
    reference, ref_trainer = fit("auto", module=TinyLM(**options), accumulate_grad_batches=accumulate)
    offloaded, trainer = fit("single_gpu_offload_deepspeed", module=TinyLM(**options), accumulate_grad_batches=accumulate)
    assert_losses_close(offloaded.losses, reference.losses, CPU_ADAM_RTOL)
    assert trainer.global_step == ref_trainer.global_step == 8 // accumulate
    assert type(trainer.strategy.optimizers[0].optimizer) is torch.optim.SGD


def test_step_interval_lr_schedule_takes_effect() -> None:
    reference, _ = fit("auto", module=TinyLM(scheduler="step"))
    offloaded, trainer = fit("single_gpu_offload_deepspeed", module=TinyLM(scheduler="step"))
    assert_losses_close(offloaded.losses, reference.losses, CPU_ADAM_RTOL)
    # StepLR(step_size=2, gamma=0.5) over 8 optimizer steps: 4 halvings.
    assert trainer.strategy.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-2 / 16)


def test_gradient_clipping_takes_effect() -> None:
    options = dict(optimizer="sgd", lr=0.5)
    reference, _ = fit("auto", module=TinyLM(**options), gradient_clip_val=0.05)
    clipped, _ = fit("single_gpu_offload_deepspeed", module=TinyLM(**options), gradient_clip_val=0.05)
    unclipped, _ = fit("single_gpu_offload_deepspeed", module=TinyLM(**options))
    assert_losses_close(clipped.losses, reference.losses, CPU_ADAM_RTOL)
    assert abs(clipped.losses[-1] - unclipped.losses[-1]) > 1e-2


def test_save_and_resume_reproduce_uninterrupted_losses(tmp_path) -> None:
    uninterrupted, _ = fit("single_gpu_offload_deepspeed", module=TinyLM(scheduler="step"), max_epochs=2)
    first, trainer = fit("single_gpu_offload_deepspeed", module=TinyLM(scheduler="step"), max_epochs=1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed, _ = fit("single_gpu_offload_deepspeed", module=TinyLM(scheduler="step"), max_epochs=2,
                     ckpt_path=str(tmp_path / "epoch1.ckpt"))
    assert_losses_close(first.losses + resumed.losses, uninterrupted.losses, 1e-6)


def test_consolidated_state_dict_loads_into_plain_module(tmp_path) -> None:
    module, trainer = fit("single_gpu_offload_deepspeed")
    inputs = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        trained_logits = trainer.strategy.model(inputs)
    trainer.save_checkpoint(tmp_path / "last.ckpt")

    state_dict = lightning_offload.consolidate(tmp_path / "last.ckpt", tmp_path / "model.pt")
    plain = TinyLM()
    plain.configure_model()
    plain.load_state_dict(torch.load(tmp_path / "model.pt"), strict=True)
    assert plain.net.head.weight is plain.net.embed.weight
    torch.testing.assert_close(plain(inputs), trained_logits, rtol=1e-5, atol=1e-5)
    assert set(state_dict) == set(plain.state_dict())


def test_two_fits_in_one_process() -> None:
    first, _ = fit("single_gpu_offload_deepspeed", num_batches=2)
    second, _ = fit("single_gpu_offload_deepspeed", num_batches=2)
    assert first.losses == second.losses
    again, _ = fit("single_gpu_offload_deepspeed", module=first, num_batches=2)
    assert len(again.losses) == 4 and again.losses[2] < again.losses[0]


def test_later_runs_in_the_process_get_torch_linear_back() -> None:
    # zero.Init swaps DeepSpeed's linear into torch for the whole process: a later run would compute its linear
    # layers through it, rounding differently and finishing their gradients in another order (the `host_adam`
    # engine then stepped its buckets out of their layout's order).
    torch_linear = torch.nn.functional.linear
    linear_in_training: list[object] = []

    class RecordLinear(pl.Callback):
        def on_train_start(self, *args: object) -> None:
            linear_in_training.append(torch.nn.functional.linear)

    fit("single_gpu_offload_deepspeed", num_batches=1, callbacks=[RecordLinear()])
    [linear_in_training_run] = linear_in_training
    assert linear_in_training_run is not torch_linear, "the run itself keeps DeepSpeed's linear"
    assert torch.nn.functional.linear is torch_linear


def test_more_than_one_device_is_refused() -> None:
    with pytest.raises(ValueError, match="trains on one device.*devices=1"):
        fit("single_gpu_offload_deepspeed", devices=2)


def test_value_clipping_is_refused() -> None:
    with pytest.raises(ValueError, match="clips by global norm only"):
        fit("single_gpu_offload_deepspeed", gradient_clip_val=1.0, gradient_clip_algorithm="value")


def test_gradient_hook_of_the_module_is_refused() -> None:
    from lightning.pytorch.utilities import grad_norm

    class LogsGradNorms(TinyLM):
        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
            self.log_dict(grad_norm(self, norm_type=2))

    with pytest.raises(ValueError, match=r"`LogsGradNorms` overrides `on_before_optimizer_step`.*'deepspeed'"):
        fit("single_gpu_offload_deepspeed", module=LogsGradNorms())


def test_amsgrad_is_refused_with_alternative() -> None:
    with pytest.raises(ValueError, match=r"amsgrad=True.*SGD"):
        fit("single_gpu_offload_deepspeed", module=TinyLM(optimizer="adam", optimizer_kwargs={"amsgrad": True}))


def test_empty_param_group_is_refused() -> None:
    class DimensionGrouped(TinyLM):
        def configure_optimizers(self):
            return torch.optim.AdamW([{"params": [p for p in self.parameters() if p.ndim >= 2]},
                                      {"params": [p for p in self.parameters() if p.ndim < 2]}])

    with pytest.raises(ValueError, match="0-element placeholders"):
        fit("single_gpu_offload_deepspeed", module=DimensionGrouped())


def test_unknown_backend_and_option_are_refused() -> None:
    with pytest.raises(ValueError, match="Choose one of"):
        SingleGPUOffloadStrategy(backend="zero9")
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['offload_paramz'\]"):
        SingleGPUOffloadStrategy(backend="deepspeed", offload_paramz=True)
    with pytest.raises(ValueError, match="gradient_accumulation_steps.*accumulate_grad_batches"):
        SingleGPUOffloadStrategy(backend="deepspeed", config={"gradient_accumulation_steps": 4})


def test_metric_state_and_buffers_follow_the_device_parameters_stay() -> None:
    from lightning_offload.strategy import _move_non_parameter_state
    from torchmetrics.text import Perplexity

    module = torch.nn.Module()
    module.metric = Perplexity()
    module.layer = torch.nn.BatchNorm1d(3)
    _move_non_parameter_state(module, torch.device("meta"))
    assert module.metric.total_log_probs.device.type == "meta" and module.layer.running_mean.device.type == "meta"
    assert module.layer.weight.device.type == "cpu"


def test_expandable_segments_only_for_cuda_and_only_when_the_user_left_the_allocator_alone(monkeypatch) -> None:
    from lightning_offload import strategy
    from lightning_offload.strategy import prefer_expandable_segments

    settings: list[str] = []
    monkeypatch.setattr(strategy, "set_allocator_settings", settings.append)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    prefer_expandable_segments(torch.device("cpu"))
    assert settings == []
    prefer_expandable_segments(torch.device("cuda", 0))
    assert settings == ["expandable_segments:True"]
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    prefer_expandable_segments(torch.device("cuda", 0))
    assert settings == ["expandable_segments:True"]


def test_a_pinned_backend_refuses_a_precision_it_cannot_train_before_training() -> None:
    module = TinyLM()
    with pytest.raises(ValueError, match=r"`Trainer\(precision='16-true'\)` is not supported by the `host_adam` "
                                         r"backend\. Use 'bf16-mixed' or 'bf16-true' .* or '32-true' .*; to keep "
                                         r"'16-true', pin `backend='deepspeed'` or `backend='device'`"):
        fit(SingleGPUOffloadStrategy(backend="host_adam"), precision="16-true", module=module)
    assert module.losses == []


@pytest.fixture
def turing_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A T4 (compute capability 7.5), which emulates bf16."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_on_a_gpu_that_only_emulates_it_is_refused_naming_fp16(turing_gpu: None, precision: str) -> None:
    with pytest.raises(ValueError, match=rf"`Trainer\(precision='{precision}'\)`: Tesla T4 \(compute capability "
                                         r"7\.5\) has no native bf16.*Pass `precision='16-mixed'` \(with "
                                         r"`backend='auto'`, `backend='deepspeed'` or `backend='device'`\) or "
                                         r"'32-true'"):
        refuse_emulated_bf16(precision, torch.device("cuda", 0))


@pytest.mark.parametrize(("precision", "device"),
                         [("16-mixed", "cuda:0"), ("32-true", "cuda:0"), ("bf16-mixed", "cpu")])
def test_what_a_gpu_that_only_emulates_bf16_computes_natively_is_not_refused(turing_gpu: None, precision: str,
                                                                               device: str) -> None:
    refuse_emulated_bf16(precision, torch.device(device))


def test_bf16_on_an_ampere_gpu_is_not_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    refuse_emulated_bf16("bf16-mixed", torch.device("cuda", 0))


def test_the_strategy_checks_the_precision_against_the_gpu_at_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    checked = []
    monkeypatch.setattr(strategy_module, "refuse_emulated_bf16", lambda *args: checked.append(args))
    module, _ = fit(SingleGPUOffloadStrategy(backend="device"), precision="bf16-mixed", num_batches=1)
    assert checked == [("bf16-mixed", torch.device("cpu"))] and len(module.losses) == 1


def test_under_auto_only_options_that_change_no_plan_are_taken_and_they_reach_the_chosen_backend() -> None:
    from lightning_offload.planner.terms import Plan

    with pytest.raises(ValueError, match=r"\['resident_blocks'\] need a backend.*`backend='stream'`.*'initial_weights'"):
        SingleGPUOffloadStrategy(resident_blocks=3, initial_weights="on_device")
    with pytest.raises(ValueError, match="`initial_weights='cpu'`: choose one of as_auto, on_device"):
        SingleGPUOffloadStrategy(initial_weights="cpu")  # checked now, whichever backend the planner picks
    for backend, expected in (("stream", "on_device"), ("gpu_8bit", None)):
        strategy = SingleGPUOffloadStrategy(initial_weights="on_device")
        strategy._adopt_plan(Plan(backend=backend))
        assert strategy.backend_name == backend
        assert getattr(strategy.backend.config, "initial_weights", None) == expected
