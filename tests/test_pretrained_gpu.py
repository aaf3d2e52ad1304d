"""`lightning_offload.pretrained` in `configure_model` on a CUDA GPU, under the backends that build the model there
(inside `torch.device("cuda")`): each weight reaches the GPU as the checkpoint holds it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_offload import SingleGPUOffloadStrategy
from tests.conftest import fit
from tests.test_pretrained import FineTune, save_tiny

pytestmark = pytest.mark.gpu
transformers = pytest.importorskip("transformers")


class WeightsAtStart(FineTune):
    """Records its weights where the backend placed them, before the first step changes them."""

    def on_train_start(self) -> None:
        self.placed = {name: (p.device.type, p.detach().float().cpu().clone())
                       for name, p in self.model.named_parameters()}


def load_and_compare(folder: Path, backend: str, accelerator: str) -> None:
    module, _ = fit(SingleGPUOffloadStrategy(backend=backend), num_batches=1, module=WeightsAtStart(folder),
                    accelerator=accelerator, precision="bf16-mixed")
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for name, expected in reference.named_parameters():
        device, placed = module.placed[name]
        assert device == accelerator and torch.equal(placed, expected), name


@pytest.mark.parametrize("backend", ["device", "gpu_8bit", "host_adam"])
def test_a_bf16_checkpoint_loads_where_the_backend_builds_the_model_on_the_gpu(tmp_path: Path, backend: str) -> None:
    # bf16 weights into the model's dtype and device: every tensor goes through the reader's host staging.
    load_and_compare(save_tiny(tmp_path / "llama", dtype=torch.bfloat16), backend, "cuda")
