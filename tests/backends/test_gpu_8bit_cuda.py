"""The `gpu_8bit` backend on a CUDA GPU (Triton kernel) against the CPU reference of the same math, and its memory."""

from __future__ import annotations

import pytest
import torch

from lightning_offload import SingleGPUOffloadStrategy
from lightning_offload.kernels.in_backward import InBackwardAdamW8bit
from tests.conftest import TinyLM, fit
from tests.kernels.test_triton_kernel import assert_close_to_reference
from tests.test_optim import EIGHT_BIT_RTOL
from tests.test_strategy import assert_losses_close

pytestmark = pytest.mark.gpu


def _optimizer(device: str, weights: list[torch.Tensor]) -> tuple[InBackwardAdamW8bit, list[torch.Tensor]]:
    params = [torch.nn.Parameter(w.to(device)) for w in weights]
    return InBackwardAdamW8bit([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}],
                               lr=1e-3, weight_decay=0.1), params


def test_cuda_update_matches_the_cpu_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    shapes = [(300, 257), (1000,), (64, 64), (7,)]
    weights = [torch.randn(shape, generator=generator).bfloat16() for shape in shapes]
    on_gpu, gpu_params = _optimizer("cuda", weights)
    on_cpu, cpu_params = _optimizer("cpu", weights)
    for step in range(3):
        grads = [torch.randn(shape, generator=generator).bfloat16() * 10 ** (i % 4 - 2) for i, shape in
                 enumerate(shapes)]
        for params, optimizer in ((gpu_params, on_gpu), (cpu_params, on_cpu)):
            for param, grad in zip(params, grads):
                param.grad = grad.to(param.device)
            optimizer.step()  # updates every parameter that holds a gradient, as after a clipped backward
    for (_, reference), (_, kernel) in zip(on_cpu._get_buckets(), on_gpu._get_buckets()):
        # The kernel tests' tolerance (see that module's docstring), per parameter's bucket.
        assert_close_to_reference(reference, kernel, lr=1e-3)


def test_trains_on_cuda_like_the_same_update_after_backward_and_checkpoints_as_memory_needs() -> None:
    # The same fused 8-bit AdamW stepped after backward on the same GPU: updating inside backward must not change
    # the numbers. (Against the CPU run the kernels differ, and this tiny run at lr 1e-2 amplifies any difference.)
    after_backward, _ = fit(SingleGPUOffloadStrategy(backend="device", optimizer="adamw8bit_fused"),
                            precision="bf16-true", max_epochs=2, accelerator="cuda")
    # Without the memory planner (which would pin a policy first), so the backend measures and decides.
    on_gpu, trainer = fit(SingleGPUOffloadStrategy(backend="gpu_8bit", check_memory=False), precision="bf16-mixed",
                          max_epochs=2, accelerator="cuda")
    assert_losses_close(on_gpu.losses, after_backward.losses, EIGHT_BIT_RTOL)
    assert all(p.dtype == torch.bfloat16 and p.grad is None for p in on_gpu.parameters())
    assert trainer.strategy.backend.checkpointed_blocks == 0  # a tiny model fits without recompute


def _peak_training_bytes(strategy: SingleGPUOffloadStrategy) -> tuple[int, int]:
    module = TinyLM()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    big = dict(vocab_size=64, d_model=512, n_layers=4, n_heads=8, max_seq_len=16)
    module.configure_model = lambda: _build(module, big)
    fit(strategy, precision="bf16-true", module=module, num_batches=3, accelerator="cuda")
    return torch.cuda.max_memory_allocated(), sum(p.numel() * p.element_size() for p in module.parameters())


def _build(module: TinyLM, network: dict) -> None:
    from lightning_offload.models import TinyGPT

    if module.net is None:
        module.net = TinyGPT(**network)


def test_no_gradient_buffer_exists() -> None:
    in_backward, weight_bytes = _peak_training_bytes(SingleGPUOffloadStrategy(backend="gpu_8bit", check_memory=False))
    after_backward, _ = _peak_training_bytes(SingleGPUOffloadStrategy(backend="device", optimizer="adamw8bit_fused",
                                                                      check_memory=False))
    # Stepping after backward holds every gradient (2 bytes a weight) at once; in backward, one at a time.
    assert after_backward - in_backward > 0.7 * weight_bytes
