"""The bucket, the state format and the reference step (CPU)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lightning_offload.kernels import BLOCK_SIZE, Bucket8bit, fused_adamw8bit_step
from lightning_offload.kernels.format import mix32
from lightning_offload.kernels.reference import decode_v, dequantize, encode_m, encode_v, mix32_tensor


def adamw_fp64(params, grads_per_step, lr, betas, eps, weight_decay):
    """Textbook AdamW in float64: the ground truth."""
    params = [p.double().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        for p, g, m_, v_ in zip(params, grads, m, v):
            g = g.double()
            p.mul_(1 - lr * weight_decay)
            m_.mul_(betas[0]).add_(g, alpha=1 - betas[0])
            v_.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
            p.sub_(lr * (m_ / (1 - betas[0] ** t)) / ((v_ / (1 - betas[1] ** t)).sqrt() + eps))
    return params, m, v


def test_package_import_loads_neither_triton_nor_bitsandbytes():
    # Lightning itself may import triton (through torch's compiler stack) when it is installed: only what
    # `lightning_offload.kernels` adds on top counts.
    code = ("import sys, lightning_offload; before = set(sys.modules); import lightning_offload.kernels; "
            "print(sorted({'triton', 'bitsandbytes'} & (set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_hash_is_the_same_in_python_and_torch():
    x = torch.randint(0, 2**32, (1000,), dtype=torch.int64)
    assert mix32_tensor(x).tolist() == [mix32(int(i)) for i in x]


def test_reference_matches_fp64_adamw():
    torch.manual_seed(0)
    shapes = [(33, 70), (300,), (1,)]
    params = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) * (1 + i) for i, s in enumerate(shapes)] for _ in range(5)]
    expected, _, _ = adamw_fp64(params, grads, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    bucket = Bucket8bit.create([p.clone() for p in params])
    for step_grads in grads:
        fused_adamw8bit_step(bucket, step_grads, lr=1e-2, weight_decay=0.1)
    for start, got, want in zip(params, bucket.params, expected):
        # The 8-bit state perturbs each element's update by a few percent, not the weights.
        assert (got.double() - want).norm() / (want - start.double()).norm() < 0.05


def test_quantised_state_tracks_fp64_adamw_closer_than_bitsandbytes():
    """200 steps of noisy gradients whose scale spreads ~1e4x inside a block (lr 0: only the state moves)."""
    torch.manual_seed(0)
    n, steps, beta1, beta2 = 64 * BLOCK_SIZE, 200, 0.9, 0.999
    scale = torch.exp(torch.randn(n) * 1.5)
    drift = torch.randn(n) * 0.3
    bucket = Bucket8bit.create([torch.zeros(n)])
    m_ref, v_ref = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    gradients = []
    for t in range(1, steps + 1):
        g = scale * (drift + torch.randn(n)) / (1 + t / 100)
        gradients.append(g)
        m_ref = beta1 * m_ref + (1 - beta1) * g.double()
        v_ref = beta2 * v_ref + (1 - beta2) * g.double() ** 2
        fused_adamw8bit_step(bucket, [g], lr=0.0)
    m_hat, v_hat = m_ref / (1 - beta1**steps), v_ref / (1 - beta2**steps)
    update_ref = m_hat / (v_hat.sqrt() + 1e-8)
    m, v = dequantize(bucket, 0)  # the state holds the bias-corrected moments
    update = m / (v.sqrt() + 1e-8)
    error = ((update - update_ref).norm() / update_ref.norm()).item()
    sqrt_v_ratio = (v.double() / v_hat).sqrt()
    assert sqrt_v_ratio.quantile(0.01) > 0.85 and error < 0.2
    assert update.abs().max() < 1.35 * update_ref.abs().max()  # no element's update blows up

    bnb = pytest.importorskip("bitsandbytes")
    weight = torch.nn.Parameter(torch.zeros(n))
    optimizer = bnb.optim.Adam8bit([weight], lr=0.0, min_8bit_size=0)
    for g in gradients:
        weight.grad = g
        optimizer.step()
    state = optimizer.state[weight]
    m_bnb, v_bnb = (bnb.functional.dequantize_blockwise(state[f"state{i}"], absmax=state[f"absmax{i}"],
                                                        code=state[f"qmap{i}"], blocksize=BLOCK_SIZE)
                    / (1 - beta**steps) for i, beta in ((1, beta1), (2, beta2)))
    update_bnb = m_bnb / (v_bnb.sqrt() + 1e-8)
    assert error <= ((update_bnb - update_ref).norm() / update_ref.norm()).item()


def test_small_v_next_to_a_huge_one_does_not_blow_up():
    """The classic failure of linear 8-bit v: v 1e-12 x the block's absmax would round to 0."""
    v = torch.full((1, BLOCK_SIZE), 1e-12)
    v[0, 0] = 1.0
    codes, absmax = encode_v(v)
    decoded = decode_v(codes, absmax)
    assert (codes[0, 1:] > 0).all() and (decoded >= v * 0.97).all()
    m = torch.full((1, BLOCK_SIZE), 1e-6)
    m[0, 0] = 1.0
    m_codes, m_absmax = encode_m(m)
    assert (m_codes[0, 1:] == 0).all()  # a small m may vanish; the update then is 0, never 1e-6 / 0


def test_state_is_eight_bit_in_one_buffer():
    params = [torch.zeros(1000, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.bfloat16), torch.zeros(256)]
    with pytest.raises(ValueError, match="one dtype"):
        Bucket8bit.create(params)
    bucket = Bucket8bit.create(params[:2])
    blocks = 4 + 1
    assert bucket.num_blocks == blocks and bucket.state.dtype == torch.uint8 and bucket.state.is_contiguous()
    assert bucket.state.numel() == blocks * (2 * BLOCK_SIZE + 16)  # 2.06 bytes per element
    assert (bucket.m_codes.dtype, bucket.v_codes.dtype) == (torch.int8, torch.uint8)
    assert (bucket.m_absmax.dtype, bucket.v_absmax.dtype) == (torch.float32, torch.float32)
    assert bucket.m_codes.shape == bucket.v_codes.shape == (blocks, BLOCK_SIZE)
    for view in (bucket.m_codes, bucket.v_codes, bucket.m_absmax, bucket.v_absmax, bucket.tensor_state(1)):
        assert view.untyped_storage().data_ptr() == bucket.state.untyped_storage().data_ptr()
    assert bucket.tensor_state(1).shape == (1, 2 * BLOCK_SIZE + 16)
    fused_adamw8bit_step(bucket, [torch.ones(1000, dtype=torch.bfloat16), None], lr=1e-3)
    assert bucket.m_codes[:4].abs().max() == 127 and bucket.v_codes[:4].max() == 255
    assert bucket.tensor_state(1).count_nonzero() == 0


@pytest.mark.parametrize("numels", [[1], [255, 257, 1, 0], [BLOCK_SIZE * 3]])
def test_awkward_sizes_and_missing_gradients(numels):
    torch.manual_seed(0)
    params = [torch.randn(n, dtype=torch.bfloat16) for n in numels]
    bucket = Bucket8bit.create([p.clone() for p in params])
    grads = [torch.randn(n, dtype=torch.bfloat16) for n in numels]
    grads[0] = None
    fused_adamw8bit_step(bucket, grads, lr=0.1)
    assert torch.equal(bucket.params[0], params[0]) and bucket.steps[0] == 0
    for before, after, grad in zip(params[1:], bucket.params[1:], grads[1:]):
        assert after.shape == before.shape and bool(torch.isfinite(after).all())
        if grad.numel():
            assert not torch.equal(before, after)


def test_stochastic_rounding_keeps_updates_below_half_an_ulp():
    """lr x update = 1e-3 is under half a bf16 ulp at 1.0 (2^-9 ~ 2e-3): round-to-nearest never moves the weight."""
    n, steps, lr = 4096, 100, 1e-3
    results = {}
    for stochastic in (True, False):
        bucket = Bucket8bit.create([torch.ones(n, dtype=torch.bfloat16)])
        for _ in range(steps):
            fused_adamw8bit_step(bucket, [torch.ones(n, dtype=torch.bfloat16)], lr=lr,
                                 stochastic_rounding=stochastic)
        results[stochastic] = bucket.params[0].float()
    assert (results[False] == 1.0).all()
    assert results[True].mean().item() == pytest.approx(1.0 - steps * lr, abs=2e-3)
    assert results[True].std().item() > 0  # each weight rounds on its own


def test_stochastic_rounding_is_deterministic_given_seed_and_step():
    def run(seed):
        torch.manual_seed(0)
        bucket = Bucket8bit.create([torch.randn(3000, dtype=torch.bfloat16)])
        for _ in range(3):
            fused_adamw8bit_step(bucket, [torch.randn(3000, dtype=torch.bfloat16)], lr=1e-3, seed=seed)
        return bucket.params[0]

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
