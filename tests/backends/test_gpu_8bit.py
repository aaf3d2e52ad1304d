"""The `gpu_8bit` backend on the CPU (the fused update's torch reference): updates inside backward, against the same
8-bit AdamW stepped after backward and against fp32 AdamW."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

import lightning_offload
from lightning_offload import SingleGPUOffloadStrategy
from lightning_offload.activation_checkpointing import find_blocks, is_checkpointed
from lightning_offload.backends.gpu_8bit import blocks_to_checkpoint
from lightning_offload.kernels.format import RECORD_BYTES
from tests.conftest import TinyLM, fit, token_batches
from tests.test_optim import EIGHT_BIT_RTOL
from tests.test_strategy import assert_losses_close

# Updating inside backward changes when, not what: the same 8-bit AdamW stepped after backward on the same bf16
# weights draws the same rounding bits, so the losses agree to float printing noise.
SAME_MATH_RTOL = 1e-6


def gpu_8bit(**options) -> SingleGPUOffloadStrategy:
    return SingleGPUOffloadStrategy(backend="gpu_8bit", **options)


def after_backward_8bit(**options) -> SingleGPUOffloadStrategy:
    return SingleGPUOffloadStrategy(backend="device", optimizer="adamw8bit_fused", **options)


def test_losses_track_fp32_adamw_and_equal_the_same_update_after_backward() -> None:
    reference, _ = fit("auto", max_epochs=2)
    module, trainer = fit(gpu_8bit(), precision="bf16-mixed", max_epochs=2)
    # bf16 weights + 8-bit state vs fp32 AdamW, 16 steps: each loss within 2%.
    assert_losses_close(module.losses, reference.losses, EIGHT_BIT_RTOL)
    assert module.losses[-1] < 0.7 * module.losses[0]
    assert all(p.dtype == torch.bfloat16 for p in module.parameters())
    # "bf16-true" on both sides: the same bf16 init draws ("bf16-mixed" draws the fp32 model's).
    in_backward, _ = fit(gpu_8bit(), precision="bf16-true", max_epochs=2)
    stepped_after, _ = fit(after_backward_8bit(), precision="bf16-true", max_epochs=2)
    assert_losses_close(in_backward.losses, stepped_after.losses, SAME_MATH_RTOL)


class _BackwardProbe(pl.Callback):
    """Per backward: did any parameter keep a gradient, and did the weights change before backward returned?"""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, bool]] = []

    def on_before_backward(self, trainer, module, loss) -> None:
        self.before = [p.detach().clone() for p in module.parameters()]

    def on_after_backward(self, trainer, module) -> None:
        changed = any(not torch.equal(a, b) for a, b in zip(self.before, module.parameters()))
        self.seen.append((any(p.grad is not None for p in module.parameters()), changed))


@pytest.mark.parametrize("accumulate", [1, 3])
def test_updates_happen_inside_the_last_micro_batchs_backward(accumulate: int) -> None:
    probe = _BackwardProbe()
    fit(gpu_8bit(), precision="bf16-true", num_batches=6, accumulate_grad_batches=accumulate, callbacks=[probe])
    accumulating, last = (True, False), (False, True)
    assert probe.seen == ([accumulating] * (accumulate - 1) + [last]) * (6 // accumulate)


def test_accumulation_matches_one_batch_of_the_same_size() -> None:
    accumulated, _ = fit(gpu_8bit(), num_batches=8, accumulate_grad_batches=2)
    one_batch = TinyLM()
    samples = token_batches(8).dataset
    trainer = pl.Trainer(strategy=gpu_8bit(), accelerator="cpu", devices=1, max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(one_batch, train_dataloaders=DataLoader(samples, batch_size=8, shuffle=False))
    pairs = torch.tensor(accumulated.losses).view(-1, 2).mean(1)
    # fp32 weights: only the summation order of the gradient differs (a code of the 8-bit state may flip).
    torch.testing.assert_close(pairs, torch.tensor(one_batch.losses), rtol=1e-4, atol=0.0)


def test_lr_scheduler_reaches_the_in_backward_updates() -> None:
    short = dict(precision="bf16-true", num_batches=4)
    module, trainer = fit(gpu_8bit(), module=TinyLM(scheduler="step"), **short)
    stepped_after, _ = fit(after_backward_8bit(), module=TinyLM(scheduler="step"), **short)
    unscheduled, _ = fit(gpu_8bit(), **short)
    assert_losses_close(module.losses, stepped_after.losses, SAME_MATH_RTOL)
    assert module.losses[-1] != unscheduled.losses[-1]
    optimizer = trainer.strategy.optimizers[0]
    assert isinstance(optimizer, torch.optim.Optimizer)
    # StepLR(step_size=2, gamma=0.5) over 4 steps; the second group keeps its own lr.
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-2 / 4, 5e-3 / 4])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]


@pytest.mark.parametrize("algorithm,clip", [("norm", 0.05), ("value", 0.01)])
def test_clipping_moves_updates_after_backward_and_is_exact(algorithm: str, clip: float) -> None:
    probe = _BackwardProbe()
    options = dict(gradient_clip_val=clip, gradient_clip_algorithm=algorithm, precision="bf16-true", num_batches=4)
    with pytest.warns(UserWarning, match="clipping by norm needs every gradient"):
        module, _ = fit(gpu_8bit(), callbacks=[probe], **options)
    stepped_after, _ = fit(after_backward_8bit(), **options)
    unclipped, _ = fit(gpu_8bit(), precision="bf16-true", num_batches=4)
    assert_losses_close(module.losses, stepped_after.losses, SAME_MATH_RTOL)
    assert module.losses[-1] != unclipped.losses[-1]
    assert all(seen == (True, False) for seen in probe.seen)


def test_resume_reproduces_the_uninterrupted_run_and_consolidates(tmp_path) -> None:
    uninterrupted, _ = fit(gpu_8bit(), precision="bf16-true", max_epochs=2)
    first, trainer = fit(gpu_8bit(), precision="bf16-true", module=TinyLM(), max_epochs=1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed, _ = fit(gpu_8bit(), precision="bf16-true", module=TinyLM(), max_epochs=2,
                     ckpt_path=str(tmp_path / "epoch1.ckpt"))
    assert first.losses + resumed.losses == uninterrupted.losses
    state = lightning_offload.consolidate(tmp_path / "epoch1.ckpt", tmp_path / "model.pt")
    plain = TinyLM()
    plain.configure_model()
    plain.load_state_dict(torch.load(tmp_path / "model.pt"))
    assert torch.equal(plain.net.head.weight, first.net.head.weight.float())
    assert plain.net.head.weight is plain.net.embed.weight and "net.head.weight" in state


class DrawnInFp32LM(TinyLM):
    """TinyLM drawn in fp32 and rounded to the default dtype `bf16-true` builds in: torch draws other random numbers
    into a bf16 tensor than into an fp32 one (in torch 2.8 every one), and the runs compared here start together."""

    def configure_model(self) -> None:
        if self.net is None:
            built_dtype = torch.get_default_dtype()
            torch.set_default_dtype(torch.float32)
            try:
                super().configure_model()
            finally:
                torch.set_default_dtype(built_dtype)
            self.net.to(built_dtype)


def test_stochastic_rounding_keeps_updates_that_round_to_nearest_loses() -> None:
    module = TinyLM()
    start = torch.cat([p.detach().float().flatten() for p in module.net_for_counting().parameters()])
    # Weights of magnitude above 2^-7 have a bf16 ulp >= 6.1e-5; an AdamW step of lr 2e-5 moves them by about 2e-5,
    # less than half an ulp, so rounding to nearest returns the old weight every time (except at a power of two,
    # where the ulp below is half as large).
    rounded = start.bfloat16().float()
    large = (rounded.abs() > 2**-7) & (torch.frexp(rounded).mantissa.abs() != 0.5)

    def displacement(strategy, precision: str) -> torch.Tensor:
        module = DrawnInFp32LM(lr=2e-5, optimizer_kwargs={"weight_decay": 0.0})
        fit(strategy, precision=precision, module=module)
        initial = start if precision == "32-true" else start.bfloat16().float()
        return (torch.cat([p.detach().float().flatten() for p in module.parameters()]) - initial)[large]

    exact = displacement("auto", "32-true")
    nearest = displacement(gpu_8bit(stochastic_rounding=False), "bf16-true")
    stochastic = displacement(gpu_8bit(), "bf16-true")
    assert nearest.abs().max() == 0
    # Stochastic rounding moves them as fp32 AdamW does, in expectation (measured: cosine 0.63, norm ratio 1.6: the
    # rounding noise adds length).
    cosine = torch.nn.functional.cosine_similarity(stochastic, exact, dim=0)
    assert cosine > 0.3 and 0.5 < stochastic.norm() / exact.norm() < 3


def test_optimizer_state_is_8bit_on_the_device_and_nothing_else() -> None:
    module, trainer = fit(gpu_8bit(), precision="bf16-true", num_batches=2)
    optimizer = trainer.strategy.optimizers[0]
    states = list(optimizer.state.values())
    assert len(states) == len(list(module.parameters()))
    assert all(set(s) == {"step", "state"} and s["state"].dtype == torch.uint8 for s in states)
    state_bytes = sum(s["state"].numel() for s in states)
    params = sum(p.numel() for p in module.parameters())
    assert state_bytes == sum(-(-p.numel() // 256) * RECORD_BYTES for p in module.parameters()) < 2.6 * params
    assert all(p.grad is None for p in module.parameters())


@pytest.mark.parametrize("optimizer,kwargs,precision,message", [
    ("sgd", {}, "bf16-true", "not SGD"),
    ("adamw", {"amsgrad": True}, "bf16-true", "amsgrad=True"),
    ("adam", {"weight_decay": 0.1}, "bf16-true", "L2"),
    ("adamw", {}, "16-true", "precision='16-true'"),
])
def test_refusals_name_the_alternative(optimizer: str, kwargs: dict, precision: str, message: str) -> None:
    # The backend's own check (the memory planner, run first by default, refuses these plans too).
    with pytest.raises(ValueError, match=message) as error:
        fit(gpu_8bit(check_memory=False), precision=precision,
            module=TinyLM(optimizer=optimizer, optimizer_kwargs=kwargs))
    assert "backend='device'" in str(error.value)


def test_blocks_to_checkpoint() -> None:
    # 10 blocks of 100 bytes, 10 kept per checkpointed block, one block recomputed at a time in backward.
    assert blocks_to_checkpoint(1000, 100, 10, 10) == 0
    assert blocks_to_checkpoint(910, 100, 10, 10) == 3  # 7 * 100 + 3 * 10 + 100 = 830 <= 910; 2 would be 920
    assert blocks_to_checkpoint(300, 100, 10, 10) == 9
    assert blocks_to_checkpoint(50, 100, 10, 10) == 10


@pytest.mark.parametrize("budget,expected", [(10**9, 0), (1, 1)])
def test_checkpoints_as_many_blocks_as_the_budget_needs(budget: int, expected: int) -> None:
    # TinyLM has two blocks; the first runs before the decision, so at most one more can be checkpointed.
    # Without the memory planner, which would otherwise pin a policy for the whole model first.
    strategy = gpu_8bit(activation_budget_bytes=budget, check_memory=False)
    _, trainer = fit(strategy, precision="bf16-true", num_batches=2)
    assert trainer.strategy.backend.checkpointed_blocks == expected


def test_a_model_left_in_eval_mode_is_measured_as_it_trains() -> None:
    # `from_pretrained` returns a model in eval mode and Lightning trains it in that mode.
    class EvalModeLM(TinyLM):
        def configure_model(self) -> None:
            super().configure_model()
            self.net.eval()

    _, trainer = fit(gpu_8bit(activation_budget_bytes=1, check_memory=False), module=EvalModeLM(),
                     precision="bf16-true", num_batches=2)
    assert trainer.strategy.backend.checkpointed_blocks == 1


def test_pinned_checkpointing_policy_is_used_as_it_is() -> None:
    strategy = gpu_8bit(activation_checkpointing="full")
    module, trainer = fit(strategy, precision="bf16-true", num_batches=4)
    assert trainer.strategy.backend.checkpointed_blocks == "policy"
    plain, _ = fit(gpu_8bit(), precision="bf16-true", num_batches=4)
    assert_losses_close(module.losses, plain.losses, SAME_MATH_RTOL)
    with pytest.raises(ValueError, match="Set one of them"):
        fit(gpu_8bit(activation_checkpointing="full", checkpoint_blocks=1), precision="bf16-true")


def test_a_later_fit_of_the_same_model_plans_its_own_checkpointing() -> None:
    # The first fit checkpoints a block as memory needs; a new strategy on the same module must not take that for
    # the model's own checkpointing (which refuses `checkpoint_blocks`).
    module, first = fit(gpu_8bit(activation_budget_bytes=1, check_memory=False), precision="bf16-true",
                        num_batches=2)
    assert first.strategy.backend.checkpointed_blocks == 1
    _, second = fit(gpu_8bit(checkpoint_blocks=0, check_memory=False), module=module, precision="bf16-true",
                    num_batches=2)
    assert second.strategy.backend.checkpointed_blocks == 0
    assert not any(is_checkpointed(block) for block in find_blocks(module))


def test_describe_is_one_line() -> None:
    line = gpu_8bit().backend.describe()
    assert "\n" not in line and "8-bit AdamW state" in line and "inside backward" in line


class _WeightsAtStart(pl.Callback):
    def on_train_start(self, trainer, module) -> None:
        self.weights = {name: p.detach().clone() for name, p in module.named_parameters()}


def test_bf16_mixed_builds_the_fp32_models_weights_rounded_once() -> None:
    built_without_strategy = TinyLM()
    built_without_strategy.configure_model()
    start = _WeightsAtStart()
    fit(gpu_8bit(), precision="bf16-mixed", num_batches=1, callbacks=[start])
    for name, weight in built_without_strategy.named_parameters():
        torch.testing.assert_close(start.weights[name], weight.detach().to(torch.bfloat16), rtol=0, atol=0, msg=name)
