"""Manual optimization (`automatic_optimization = False`) steps exactly when the module says, or is refused."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lightning_offload import SingleGPUOffloadStrategy
from tests.conftest import TinyLM, fit

STEP_EVERY = 2


class ManualLM(TinyLM):
    """Backward every batch, `step()` and `zero_grad()` every second batch."""

    def __init__(self) -> None:
        super().__init__(optimizer="adamw")
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        if (batch_idx + 1) % STEP_EVERY == 0:
            optimizer.step()
            optimizer.zero_grad()
        return loss


def _weights(module: TinyLM) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().clone() for name, p in module.named_parameters()}


def test_manual_optimization_on_the_device_backend_matches_plain_lightning() -> None:
    reference, _ = fit("auto", module=ManualLM())
    offloaded, _ = fit(SingleGPUOffloadStrategy(backend="device", check_memory=False), module=ManualLM())
    untrained = ManualLM()
    untrained.configure_model()
    initial, expected, actual = _weights(untrained), _weights(reference), _weights(offloaded)
    assert any(not torch.equal(initial[name], expected[name]) for name in expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0)  # same operations, same order


@pytest.mark.parametrize("backend", ["host_adam", "gpu_8bit", "fsdp", "deepspeed", "stream"])
def test_backends_that_update_inside_backward_refuse_manual_optimization(backend: str) -> None:
    precision = "bf16-true" if backend == "stream" else "32-true"
    with pytest.raises(ValueError, match=rf"Manual optimization .* cannot be honoured by backend '{backend}'.*"
                                         r"Pin `backend='device'`"):
        fit(SingleGPUOffloadStrategy(backend=backend, check_memory=False), module=ManualLM(), precision=precision)
