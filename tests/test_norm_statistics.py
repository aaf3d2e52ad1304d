"""A BatchNorm whose weights an engine holds in bf16 while its running statistics stay fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_offload import SingleGPUOffloadStrategy
from lightning_offload.norm_statistics import match_norm_weights_to_statistics
from tests.conformance.runs import run


def _bf16_weights_fp32_statistics() -> nn.BatchNorm2d:
    torch.manual_seed(0)
    layer = nn.BatchNorm2d(3)
    nn.init.normal_(layer.weight)
    nn.init.normal_(layer.bias)
    for parameter in layer.parameters():
        parameter.data = parameter.data.to(torch.bfloat16)
    return layer


def test_the_layer_normalizes_with_its_weights_cast_up_and_keeps_fp32_statistics() -> None:
    layer = _bf16_weights_fp32_statistics()
    x = torch.randn(4, 3, 5, 5, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError):
        layer(x)  # what the engines met: batch_norm refuses bf16 weights beside fp32 statistics
    assert match_norm_weights_to_statistics(layer) == 1
    expected_mean = torch.zeros(3)
    expected = F.batch_norm(x, expected_mean, torch.ones(3), layer.weight.float(), layer.bias.float(),
                            training=True, momentum=0.1)
    out = layer(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert layer.running_mean.dtype == torch.float32
    torch.testing.assert_close(layer.running_mean, expected_mean, rtol=0, atol=0)
    out.float().square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.bfloat16
    assert isinstance(layer.weight, nn.Parameter) and layer.weight.dtype == torch.bfloat16  # swapped back


@pytest.mark.parametrize("backend", ["host_adam", "deepspeed"])
def test_a_batchnorm_module_trains_under_bf16_mixed(backend: str) -> None:
    # bf16 weights in the forward against the plain bf16-mixed run's fp32 ones: 3% per step, as for
    # tests/backends/host_adam/test_backend.py's BF16_RTOL.
    result = run("cnn_batchnorm", SingleGPUOffloadStrategy(backend=backend), precision="bf16-mixed")
    assert result.refusal is None, result.refusal
    reference = run("cnn_batchnorm", precision="bf16-mixed")
    assert len(result.losses) == len(reference.losses) > 0
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(reference.losses), rtol=3e-2, atol=0.0)
