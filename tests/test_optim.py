"""Optimizer choice: replacing the user's optimizer class keeps groups and hyperparameters; engines step it."""

from __future__ import annotations

import pytest
import torch

from lightning_offload import SingleGPUOffloadStrategy
from lightning_offload.optim import replace_optimizer
from tests.conftest import TinyLM, fit
from tests.test_strategy import FP32_RTOL, assert_losses_close

# 8-bit state quantises the moments blockwise; over these 8 steps each loss stays within 2% of fp32 AdamW.
EIGHT_BIT_RTOL = 2e-2


def user_adamw() -> torch.optim.AdamW:
    weight, bias = torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.zeros(64))
    return torch.optim.AdamW([{"params": [weight], "weight_decay": 0.1}, {"params": [bias], "weight_decay": 0.0,
                              "lr": 1e-4}], lr=3e-4, betas=(0.8, 0.9), eps=1e-7)


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "adamw8bit_fused", "lion8bit", "cpu_adam"])
def test_replacement_keeps_groups_and_hyperparameters(name: str) -> None:
    original = user_adamw()
    replaced = replace_optimizer(original, name)
    assert [g["params"] for g in replaced.param_groups] == [g["params"] for g in original.param_groups]
    assert [(g["lr"], g["weight_decay"], g["betas"]) for g in replaced.param_groups] == [
        (3e-4, 0.1, (0.8, 0.9)), (1e-4, 0.0, (0.8, 0.9))
    ]


def test_sgd_replaced_by_adamw_takes_adamw_defaults_for_missing_hyperparameters() -> None:
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1, momentum=0.9)
    adamw = replace_optimizer(sgd, "adamw")
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["lr"] == 0.1 and adamw.param_groups[0]["betas"] == (0.9, 0.999)


def test_adamw8bit_on_deepspeed_partitions_is_8bit_and_tracks_fp32() -> None:
    reference, _ = fit("auto")
    module, trainer = fit(SingleGPUOffloadStrategy(backend="deepspeed", optimizer="adamw8bit"))
    assert_losses_close(module.losses, reference.losses, EIGHT_BIT_RTOL)
    engine_optimizer = trainer.strategy.optimizers[0].optimizer
    assert type(engine_optimizer).__name__ == "AdamW8bit"
    # bitsandbytes keeps 32-bit state for tensors under `min_8bit_size` (4096) elements: here the small flat
    # partition of biases and norms. Every larger partition must hold uint8 moments.
    large = [state for param, state in engine_optimizer.state.items() if param.numel() >= 4096]
    assert large and all(s["state1"].dtype == s["state2"].dtype == torch.uint8 for s in large)


def test_lion8bit_trains_on_deepspeed() -> None:
    module, _ = fit(SingleGPUOffloadStrategy(backend="deepspeed", optimizer="lion8bit"),
                    module=TinyLM(lr=1e-3))
    assert module.losses[-1] < module.losses[0]


def test_full_checkpointing_on_deepspeed_matches_no_checkpointing() -> None:
    plain, _ = fit("single_gpu_offload_deepspeed")
    checkpointed, _ = fit(SingleGPUOffloadStrategy(backend="deepspeed", activation_checkpointing="full"))
    assert_losses_close(checkpointed.losses, plain.losses, FP32_RTOL)


def test_paged_optimizer_without_gpu_state_is_refused_with_alternative() -> None:
    with pytest.raises(ValueError, match="optimizer='adamw8bit'"):
        fit(SingleGPUOffloadStrategy(optimizer="paged_adamw8bit"))


def test_unknown_optimizer_is_refused() -> None:
    with pytest.raises(ValueError, match="Unknown optimizer 'adam8bit'"):
        SingleGPUOffloadStrategy(optimizer="adam8bit")


def test_fused_8bit_on_device_backend_tracks_fp32() -> None:
    reference, _ = fit("auto")
    module, trainer = fit(SingleGPUOffloadStrategy(backend="device", optimizer="adamw8bit_fused"))
    assert_losses_close(module.losses, reference.losses, EIGHT_BIT_RTOL)
    assert type(trainer.strategy.optimizers[0]).__name__ == "AdamW8bitFused"
