"""The no-offload `device` backend: Lightning's own loop with the memory levers."""

from __future__ import annotations

import pytest

from lightning_offload import SingleGPUOffloadStrategy
from tests.conftest import TinyLM, fit
from tests.test_optim import EIGHT_BIT_RTOL
from tests.test_strategy import assert_losses_close


def test_device_backend_matches_plain_run() -> None:
    reference, _ = fit("auto")
    module, trainer = fit("single_gpu_offload_device")
    # Lightning's own loop, the same kernels in the same order: the same bits.
    assert module.losses == reference.losses
    assert type(trainer.strategy.optimizers[0]).__name__ == "AdamW"


def test_device_backend_with_8bit_state_and_checkpointing_resumes(tmp_path) -> None:
    def strategy() -> SingleGPUOffloadStrategy:
        return SingleGPUOffloadStrategy(backend="device", optimizer="adamw8bit", activation_checkpointing="full")

    reference, _ = fit("auto", max_epochs=2)
    uninterrupted, _ = fit(strategy(), max_epochs=2)
    assert_losses_close(uninterrupted.losses, reference.losses, EIGHT_BIT_RTOL)
    first, trainer = fit(strategy(), module=TinyLM(), max_epochs=1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed, _ = fit(strategy(), module=TinyLM(), max_epochs=2, ckpt_path=str(tmp_path / "epoch1.ckpt"))
    assert_losses_close(first.losses + resumed.losses, uninterrupted.losses, 1e-6)


def test_backend_is_told_which_backward_precedes_the_optimizer_step(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_offload.backends.device import DeviceBackend

    seen: list[bool] = []
    monkeypatch.setattr(DeviceBackend, "before_backward", lambda self, last_micro_batch: seen.append(last_micro_batch))
    fit(SingleGPUOffloadStrategy(backend="device"), num_batches=6, accumulate_grad_batches=3)
    assert seen == [False, False, True, False, False, True]
