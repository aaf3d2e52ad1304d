"""`compile_blocks=True` on a GPU: Inductor's Triton kernels in the blocks, under the in-backward plans."""

from __future__ import annotations

import pytest
import torch

from lightning_offload import SingleGPUOffloadStrategy
from tests.backends.test_stream_gpu import TinyLlama
from tests.conftest import fit
from tests.test_optim import EIGHT_BIT_RTOL
from tests.test_strategy import assert_losses_close

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("options", [dict(backend="gpu_8bit"),
                                     dict(backend="stream", resident_blocks=3, activation_checkpointing="full")],
                         ids=["gpu_8bit", "stream"])
def test_compiled_blocks_track_eager_blocks(options) -> None:
    def run(compile_blocks: bool):
        torch.manual_seed(0)
        strategy = SingleGPUOffloadStrategy(compile_blocks=compile_blocks, **options)
        return fit(strategy, module=TinyLlama(lr=1e-3), precision="bf16-mixed", accelerator="gpu", num_batches=8)[0]

    eager, compiled = run(False), run(True)
    # bf16 blocks whose elementwise work Inductor fuses (other rounding of the same math) against eager ones.
    assert_losses_close(compiled.losses, eager.losses, EIGHT_BIT_RTOL)
    assert compiled.losses[-1] < compiled.losses[0]
