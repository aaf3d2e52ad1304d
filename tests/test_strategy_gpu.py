"""`single_gpu_offload` on a CUDA device: bf16 offloaded training tracks the fp32 plain run, and resumes exactly."""

from __future__ import annotations

import pytest

from tests.conftest import TinyLM, fit
from tests.test_strategy import BF16_RTOL, assert_losses_close

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("strategy", ["single_gpu_offload_deepspeed", "single_gpu_offload_fsdp",
                                      "single_gpu_offload_device"])
def test_bf16_on_cuda_tracks_fp32_plain_run(strategy: str) -> None:
    reference, _ = fit("auto", accelerator="cuda")
    offloaded, trainer = fit(strategy, accelerator="cuda", precision="bf16-mixed")
    assert trainer.strategy.root_device.type == "cuda"
    assert_losses_close(offloaded.losses, reference.losses, BF16_RTOL)


def test_resume_on_cuda_reproduces_losses(tmp_path) -> None:
    options = dict(accelerator="cuda", precision="bf16-mixed")
    uninterrupted, _ = fit("single_gpu_offload", module=TinyLM(scheduler="step"), max_epochs=2, **options)
    first, trainer = fit("single_gpu_offload", module=TinyLM(scheduler="step"), max_epochs=1, **options)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed, _ = fit("single_gpu_offload", module=TinyLM(scheduler="step"), max_epochs=2,
                     ckpt_path=str(tmp_path / "epoch1.ckpt"), **options)
    # bf16 kernels on the GPU are deterministic for this model; allow one bf16 rounding of slack.
    assert_losses_close(first.losses + resumed.losses, uninterrupted.losses, 1e-2)


def test_cpu_accelerator_on_a_gpu_machine_stays_on_cpu() -> None:
    offloaded, trainer = fit("single_gpu_offload", accelerator="cpu", num_batches=2)
    assert trainer.strategy.root_device.type == "cpu" and offloaded.losses
