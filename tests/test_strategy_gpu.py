"""`single_gpu_offload` on a CUDA device: bf16 offloaded training tracks the fp32 plain run, resumes exactly, and
runs on the allocator's expandable segments unless the user configured the allocator."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


# A fresh process: the allocator's settings are process-wide and this one has allocated already.
_SEGMENTS_AFTER_FIT = """
import torch
from tests.conftest import fit
fit("single_gpu_offload", accelerator="cuda", precision="bf16-mixed")
segments = torch.cuda.memory_snapshot()
print(len(segments), sum(segment["is_expandable"] for segment in segments))
"""


@pytest.mark.parametrize("user_setting", [None, "max_split_size_mb:512"])
def test_cuda_fit_uses_expandable_segments_unless_the_user_configured_the_allocator(user_setting: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    if user_setting:
        env["PYTORCH_CUDA_ALLOC_CONF"] = user_setting
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", _SEGMENTS_AFTER_FIT], cwd=root, env=env, capture_output=True,
                            text=True, timeout=300, check=True)
    segments, expandable = map(int, result.stdout.split()[-2:])
    assert segments > 0
    assert expandable == (0 if user_setting else segments)
