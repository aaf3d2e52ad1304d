"""The cost model's arithmetic, checked by hand, and the probe's cache."""

from __future__ import annotations

import json
import time

import pytest
import torch

from lightning_offload.planner import Ceilings, Plan, estimate_step_time, load_or_probe
from lightning_offload.planner.cache import CACHE_ENV
from lightning_offload.planner.cost import ACHIEVED_MATMUL_FRACTION, BACKWARD_SHARE, PROBE_VERSION, training_flops
from tests.planner.test_memory import LLAMA_8B

H100 = Ceilings()


def test_compute_is_six_n_t_plus_a_forward_per_recomputed_block() -> None:
    n, tokens = LLAMA_8B.compute_parameters, LLAMA_8B.tokens
    assert training_flops(LLAMA_8B, Plan(backend="device", checkpointing="none")) == 6 * n * tokens
    assert training_flops(LLAMA_8B, Plan(backend="device", checkpointing="full")) == 8 * n * tokens
    assert training_flops(LLAMA_8B, Plan(backend="device", checkpointing="every_k", every_k=4)) == 6.5 * n * tokens
    time = estimate_step_time(LLAMA_8B, Plan(backend="device", checkpointing="full"), H100)
    assert time.compute == pytest.approx(8 * n * tokens / (773e12 * ACHIEVED_MATMUL_FRACTION))


def test_torchtune_anchor_is_reproduced_within_15_percent() -> None:
    # bf16 + 8-bit state updated in backward, every block checkpointed: 8B in 1.28 s/step (bench/RESULTS.md,
    # "Calibration constants").
    time = estimate_step_time(LLAMA_8B, Plan(backend="gpu_8bit", optimizer="adamw8bit_fused"), H100)
    assert time.total == pytest.approx(1.28, rel=0.15)


def test_offload_plans_pay_for_pcie_and_the_cpu_optimizer() -> None:
    device = estimate_step_time(LLAMA_8B, Plan(backend="device"), H100)
    deepspeed = estimate_step_time(LLAMA_8B, Plan(backend="deepspeed", optimizer="cpu_adam"), H100)
    host_adam = estimate_step_time(LLAMA_8B, Plan(backend="host_adam"), H100)
    params = LLAMA_8B.parameters
    # Three passes of bf16 weights in (forward, recompute, backward), bf16 gradients out.
    assert deepspeed.transfer == pytest.approx(3 * 2 * params / 46.7e9 + 2 * params / 55e9)
    assert device.total < host_adam.total < deepspeed.total
    # Accumulating 8 micro-batches amortises the host optimizer: per token, host_adam gets closer to the device.
    host_adam_r2 = estimate_step_time(LLAMA_8B, Plan(backend="host_adam"), H100, accumulate=8)
    device_r2 = estimate_step_time(LLAMA_8B, Plan(backend="device"), H100, accumulate=8)
    assert host_adam_r2.total / device_r2.total < host_adam.total / device.total


def test_streaming_more_resident_blocks_is_never_slower() -> None:
    times = [estimate_step_time(LLAMA_8B, Plan(backend="stream", optimizer="adamw8bit_fused", resident_blocks=r),
                                H100).total for r in (0, 8, 16, 32)]
    assert times == sorted(times, reverse=True)


def test_probe_result_is_cached_per_machine(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    first = load_or_probe(torch.device("cpu"))
    assert first.matmul_tflops > 0 and first.cpu_adamw_gparams > 0
    (cache,) = tmp_path.glob("ceilings-*.json")
    cache.write_text(json.dumps({**json.loads(cache.read_text()), "matmul_tflops": 123.0}))
    assert load_or_probe(torch.device("cpu")).matmul_tflops == 123.0
    # A cache written by an earlier version of the probe is not read: the machine is probed again.
    cache.rename(cache.with_name(cache.name.replace(f"-v{PROBE_VERSION}-", "-v1-")))
    assert load_or_probe(torch.device("cpu")).matmul_tflops != 123.0


def test_a_cpu_is_costed_at_its_blas_share_not_the_gpu_kernels(tmp_path, monkeypatch) -> None:
    cpu = Ceilings(device="cpu", matmul_tflops=0.2, h2d_gbps=float("inf"), d2h_gbps=float("inf"),
                   duplex_gbps=float("inf"), on_gpu=False)
    assert cpu.achieved_flops(512) == pytest.approx(0.2e12 * 0.8)
    assert cpu.achieved_flops(2048) == pytest.approx(0.2e12 * 0.8)  # no wider GEMM beats the probe's on a CPU
    assert cpu.achieved_flops(128) == pytest.approx(0.2e12 * 0.8 * 0.25**0.4)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert load_or_probe(torch.device("cpu")).on_gpu is False
    # The GPU formula at width 128 would cost a CPU step ~8x too slow.
    assert Ceilings(matmul_tflops=0.2).achieved_flops(128) < cpu.achieved_flops(128) / 7


def test_compiled_blocks_shorten_the_compute_and_only_the_compute() -> None:
    from dataclasses import replace

    from lightning_offload.planner.cost import COMPILED_BLOCK_TIME

    plan = Plan(backend="stream", optimizer="adamw8bit_fused", resident_blocks=32)
    eager = estimate_step_time(LLAMA_8B, plan, H100)
    compiled = estimate_step_time(replace(LLAMA_8B, compiled_blocks=True), plan, H100)
    assert compiled.compute == pytest.approx(COMPILED_BLOCK_TIME * eager.compute)
    assert (compiled.transfer, compiled.optimizer) == (eager.transfer, eager.optimizer)
    assert compiled.total < eager.total


def test_a_probed_rate_is_its_fastest_run_not_one_stalled_by_another_thread() -> None:
    from lightning_offload.planner.cost import _rate

    durations = iter([0.0, 0.06, 0.01, 0.06])  # the warm-up run, then one fast run among stalled ones
    rate = _rate(lambda: time.sleep(next(durations)), work=1.0, repeats=3, synchronize=lambda: None)
    assert 1 / 0.02 < rate <= 1 / 0.01


def test_activation_offload_costs_only_the_copy_time_compute_does_not_hide() -> None:
    none = estimate_step_time(LLAMA_8B, Plan(backend="device", checkpointing="none"), H100)
    offload = estimate_step_time(LLAMA_8B, Plan(backend="device", checkpointing="offload"), H100)
    saved = LLAMA_8B.blocks * LLAMA_8B.activation_bytes_per_block
    assert offload.transfer == pytest.approx(saved / 55e9 + saved / 46.7e9)
    forward, backward = (1 - BACKWARD_SHARE) * none.compute, BACKWARD_SHARE * none.compute
    exposed = max(0.0, saved / 55e9 - forward) + max(0.0, saved / 46.7e9 - backward)
    assert offload.total == pytest.approx(none.total + exposed)
    # On a link 100 times slower, every copy second beyond compute shows.
    slow_link = Ceilings(h2d_gbps=0.467, d2h_gbps=0.55)
    slow = estimate_step_time(LLAMA_8B, Plan(backend="device", checkpointing="offload"), slow_link)
    assert slow.total == pytest.approx(none.total + slow.transfer - none.compute)


def test_host_adam_front_blocks_on_the_gpu_shorten_the_exposed_host_update() -> None:
    all_host = estimate_step_time(LLAMA_8B, Plan(backend="host_adam"), H100)
    half = estimate_step_time(LLAMA_8B, Plan(backend="host_adam", resident_blocks=16), H100)
    # By hand: compute 8 x 7,504,924,672 x 8192 / (773e12 x 0.5) = 1.2726 s; backward 0.7 of it = 0.8908 s.
    # 16 blocks and the embedding (4,015,128,576 parameters) are updated on the GPU at 100 Gparam/s: 0.0402 s;
    # the other 4,015,132,672 go through the host at 3.9 x 0.44 Gparam/s: 2.3398 s, hidden under the backward and
    # the next forward through the front half (0.3 x 1.2726 / 2 = 0.1909 s): 1.2581 s exposed.
    assert half.compute == pytest.approx(1.2726, abs=1e-4)
    assert half.total == pytest.approx(1.2726 + 1.2581 + 0.0402, abs=1e-3)
    # Everything on the host: 8,030,261,248 / 1.716e9 = 4.6796 s, 0.8908 of it hidden.
    assert all_host.total == pytest.approx(1.2726 + 4.6796 - 0.8908, abs=1e-3)
    times = [estimate_step_time(LLAMA_8B, Plan(backend="host_adam", resident_blocks=r), H100).total
             for r in (0, 8, 16, 24, 32)]
    assert times == sorted(times, reverse=True)
