"""The Triton kernel against the torch reference: under Triton's interpreter on CPU, compiled on a GPU.

Tolerance. The GPU kernel uses approximate sqrt/log2/exp2/division and fused multiply-adds, the reference exact
ones, so a code can land one step apart at a rounding boundary, and the difference then lives on in the state
(an m near 0 can even flip sign: a sqrt-coded -9 vs +8). After several steps we require: every decoded m within
5% of its block's absmax and every v within 13% (two log codes), under 1% of the codes differing at all; scales
within 3%, under 1% of them beyond 1e-5; every weight within 1 bf16 ulp + 2 lr of the reference (no more than two
Adam steps apart), and under 0.1% of the weights beyond 1 ulp + 1e-3 lr. Emulating the GPU by nudging every
moment +-1 ulp at random before encoding gave at most 2.2% (m), 6% (v), 1.3% (scales), 0.77 lr, and 8e-5.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_offload.kernels import Bucket8bit, fused_adamw8bit_step

AWKWARD_NUMELS = [1, 255, 257, 1024, 1000, 4096 + 3, 0, 7]


def run_both(numels, param_dtype, grad_dtype, stochastic_rounding, device, steps=3, lr=1e-2):
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=generator).to(param_dtype) for n in numels]
    reference = Bucket8bit.create([p.clone() for p in params], keys=range(10, 10 + len(params)))
    kernel = Bucket8bit.create([p.clone().to(device) for p in params], keys=range(10, 10 + len(params)))
    for step in range(steps):
        grads = [torch.randn(n, generator=generator).to(grad_dtype) * 10 ** (i % 4 - 2)
                 for i, n in enumerate(numels)]
        grads[step % len(grads)] = None  # a tensor without a gradient this step
        hyper = dict(lr=lr, betas=(0.9, 0.99), weight_decay=0.1, seed=5, stochastic_rounding=stochastic_rounding)
        fused_adamw8bit_step(reference, grads, backend="reference", **hyper)
        fused_adamw8bit_step(kernel, [g if g is None else g.to(device) for g in grads], backend="triton", **hyper)
    return reference, kernel


def assert_close_to_reference(reference, kernel, lr):
    from lightning_offload.kernels.reference import decode_m, decode_v

    got = Bucket8bit(kernel.params, kernel.state.cpu(), kernel.block_offsets, kernel.keys)
    assert kernel.steps == reference.steps
    absmax = torch.maximum(reference.m_absmax, got.m_absmax)[:, None]
    m_error = (decode_m(got.m_codes, got.m_absmax) - decode_m(reference.m_codes, reference.m_absmax)).abs()
    assert (m_error <= 0.05 * absmax).all()
    v_want, v_got = decode_v(reference.v_codes, reference.v_absmax), decode_v(got.v_codes, got.v_absmax)
    assert ((v_got - v_want).abs() <= 0.13 * v_want).all()
    for codes in ("m_codes", "v_codes"):
        assert (getattr(got, codes) != getattr(reference, codes)).float().mean() < 0.01, codes
    for scale in ("m_absmax", "v_absmax"):
        error = (getattr(got, scale) - getattr(reference, scale)).abs() / getattr(reference, scale).clamp_min(1e-30)
        assert error.max() < 0.03 and (error > 1e-5).float().mean() < 0.01, scale
    want = torch.cat([p.float().flatten() for p in reference.params])
    got = torch.cat([p.float().cpu().flatten() for p in kernel.params])
    ulp = torch.finfo(torch.bfloat16).eps * want.abs() if reference.params[0].dtype == torch.bfloat16 else 0 * want
    error = (got - want).abs()
    assert (error <= ulp + 2 * lr).all()
    assert (error > ulp + 1e-3 * lr).float().mean() < 1e-3


CASES = [(torch.bfloat16, torch.bfloat16, True), (torch.bfloat16, torch.float32, False),
         (torch.float32, torch.float32, False)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the compiled kernel")
def test_interpreted_kernel_matches_reference():
    pytest.importorskip("triton")
    # TRITON_INTERPRET must be set before triton is first imported, so the interpreter runs in a fresh process.
    code = (
        "from tests.kernels.test_triton_kernel import *\n"
        "for param_dtype, grad_dtype, stochastic_rounding in CASES:\n"
        "    reference, kernel = run_both(AWKWARD_NUMELS, param_dtype, grad_dtype, stochastic_rounding, 'cpu', 2)\n"
        "    assert_close_to_reference(reference, kernel, lr=1e-2)\n"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=root, capture_output=True, text=True,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("param_dtype", "grad_dtype", "stochastic_rounding"), CASES)
def test_gpu_kernel_matches_reference(param_dtype, grad_dtype, stochastic_rounding):
    numels = AWKWARD_NUMELS + [4096 * 37 + 5, 1 << 20, 300_000]
    reference, kernel = run_both(numels, param_dtype, grad_dtype, stochastic_rounding, "cuda", steps=5)
    assert_close_to_reference(reference, kernel, lr=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_optimizer_resumes_exactly():
    from lightning_offload.kernels import AdamW8bitFused

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, device="cuda", dtype=torch.bfloat16)) for n in (1000, 70_000, 1)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(6)]

    def run(optimizer, steps):
        for step_grads in steps:
            for p, g in zip(optimizer.param_groups[0]["params"], step_grads):
                p.grad = g
            optimizer.step()

    optimizer = AdamW8bitFused(params, lr=1e-3)
    run(optimizer, grads[:3])
    saved = {k: v for k, v in optimizer.state_dict().items()}
    saved = {"state": {i: {k: v.clone() for k, v in s.items()} for i, s in saved["state"].items()},
             "param_groups": saved["param_groups"]}
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    run(optimizer, grads[3:])
    resumed = AdamW8bitFused(resumed_params, lr=1e-3)
    resumed.load_state_dict(saved)
    run(resumed, grads[3:])
    for want, got in zip(params, resumed_params):
        assert torch.equal(want, got)
