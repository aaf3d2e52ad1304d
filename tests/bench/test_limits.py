"""Limit arithmetic: which ceiling bounds each method's step, on a made-up machine with round numbers."""

from __future__ import annotations

import pytest

from bench.limits import COSTS, D2H, DUPLEX, H2D, MATMUL, Cost, attention_key, limit_step, model_matmul_key
from bench.report import PROBE_FIGURES

PROBE = {
    "bf16_matmul_TFLOPs": 800, "h2d_pinned_GBps": 50, "d2h_pinned_GBps": 50, "duplex_pinned_GBps": 80,
    "cpu_adamw_fused_Gparam_per_s": 4, "cpu_adamw_foreach_Gparam_per_s": 2, "cpu_deepspeed_adam_Gparam_per_s": 5,
    "gpu_adamw_fused_fp32_Gparam_per_s": 100, "gpu_bnb_adamw8bit_Gparam_per_s": 50,
    "gpu_fused_adamw8bit_Gparam_per_s": 200,
}
PARAMS, MATMUL_PARAMS = 10**10, 10**10  # 10 B; the embedding left out to keep the numbers round
TOKENS = 8192


def test_gpu_resident_method_is_bound_by_compute_plus_its_gpu_update():
    limit = limit_step(PARAMS, MATMUL_PARAMS, TOKENS, 1, COSTS["gpu_adamw"], PROBE)
    compute = 8 * 1e10 * 8192 / 800e12  # forward + recompute + backward
    assert limit.bound == "compute"
    assert limit.step_s == pytest.approx(compute + 1e10 / 100e9)
    assert limit.parts_s["pcie"] == 0 and limit.parts_s["cpu optimizer"] == 0


def test_zero3_offload_at_r1_is_bound_by_pcie_in_both_directions_at_once():
    limit = limit_step(PARAMS, MATMUL_PARAMS, TOKENS, 1, COSTS["zero3_offload"], PROBE)
    # 4 B/param each way: one direction alone needs 0.8 s, both together share 80 GB/s -> 1.0 s.
    assert limit.parts_s["pcie"] == pytest.approx(8e10 / 80e9)
    assert limit.parts_s["cpu optimizer"] == pytest.approx(1e10 / 5e9)
    assert limit.bound == "cpu optimizer" and limit.step_s == pytest.approx(2.0)


def test_accumulation_multiplies_per_micro_batch_traffic_not_the_update():
    r1 = limit_step(PARAMS, MATMUL_PARAMS, TOKENS, 1, COSTS["zero2_offload"], PROBE)
    r2 = limit_step(PARAMS, MATMUL_PARAMS, TOKENS, 8, COSTS["zero2_offload"], PROBE)
    assert r2.parts_s["compute"] == pytest.approx(8 * r1.parts_s["compute"])
    assert r2.parts_s["pcie"] == pytest.approx(8 * 4e10 / 50e9)  # gradients out every micro-batch
    assert r2.parts_s["cpu optimizer"] == pytest.approx(r1.parts_s["cpu optimizer"])
    assert r2.bound == "compute"


def test_zenflow_updates_a_quarter_of_the_cpu_work_per_step():
    zero2 = limit_step(PARAMS, MATMUL_PARAMS, TOKENS, 1, COSTS["zero2_offload"], PROBE)
    zenflow = limit_step(PARAMS, MATMUL_PARAMS, TOKENS, 1, COSTS["zenflow"], PROBE)
    assert zenflow.parts_s["cpu optimizer"] == pytest.approx(zero2.parts_s["cpu optimizer"] / 4)


def test_one_direction_alone_can_be_the_pcie_bound():
    one_way = Cost("cpu_adamw_fused_Gparam_per_s", h2d_per_micro_batch=8)
    limit = limit_step(PARAMS, MATMUL_PARAMS, TOKENS, 1, one_way, PROBE)
    assert limit.parts_s["pcie"] == pytest.approx(8e10 / 50e9)


def test_a_missing_probe_figure_is_named():
    probe = {key: value for key, value in PROBE.items() if key != "cpu_deepspeed_adam_Gparam_per_s"}
    with pytest.raises(KeyError, match="cpu_deepspeed_adam"):
        limit_step(PARAMS, MATMUL_PARAMS, TOKENS, 1, COSTS["zero3_offload"], probe)


def test_every_figure_the_limits_read_is_in_the_probe_table():
    read = {MATMUL, H2D, D2H, DUPLEX, *(cost.optimizer_rate for cost in COSTS.values())}
    assert read <= set(PROBE) and read <= set(PROBE_FIGURES)


def test_a_size_s_own_matmul_rate_replaces_the_square_one_where_the_probe_has_it():
    probe = {**PROBE, model_matmul_key("8b"): 640}
    own = limit_step(PARAMS, MATMUL_PARAMS, TOKENS, 1, COSTS["gpu_adamw"], probe, size="8b")
    assert own.parts_s["compute"] == pytest.approx(8 * 1e10 * 8192 / 640e12 + 1e10 / 100e9)
    square = limit_step(PARAMS, MATMUL_PARAMS, TOKENS, 1, COSTS["gpu_adamw"], probe, size="3.6b")
    assert square.parts_s["compute"] == pytest.approx(8 * 1e10 * 8192 / 800e12 + 1e10 / 100e9)


def test_the_attention_the_probe_timed_adds_to_compute_once_per_micro_batch():
    probe = {**PROBE, model_matmul_key("8b"): 640, attention_key("8b"): 50.0}
    r1 = limit_step(PARAMS, MATMUL_PARAMS, TOKENS, 1, COSTS["gpu_adamw"], probe, size="8b")
    r2 = limit_step(PARAMS, MATMUL_PARAMS, TOKENS, 8, COSTS["gpu_adamw"], probe, size="8b")
    gemms = 8 * 1e10 * 8192 / 640e12
    assert r1.parts_s["compute"] == pytest.approx(gemms + 0.050 + 1e10 / 100e9)
    assert r2.parts_s["compute"] == pytest.approx(8 * (gemms + 0.050) + 1e10 / 100e9)
    without = limit_step(PARAMS, MATMUL_PARAMS, TOKENS, 1, COSTS["gpu_adamw"], probe, size="3.6b")
    assert without.parts_s["compute"] == pytest.approx(8 * 1e10 * 8192 / 800e12 + 1e10 / 100e9)


def test_recomputing_no_block_is_charged_six_passes_instead_of_eight():
    from dataclasses import replace

    probe = {**PROBE, model_matmul_key("8b"): 640, attention_key("8b"): 40.0}
    no_recompute = replace(COSTS["gpu_adamw"], recompute_share=0.0)
    limit = limit_step(PARAMS, MATMUL_PARAMS, TOKENS, 1, no_recompute, probe, size="8b")
    assert limit.parts_s["compute"] == pytest.approx(6 * 1e10 * 8192 / 640e12 + 0.030 + 1e10 / 100e9)
