"""Timing and measuring shared by every method, checked on the CPU: loops, the Lightning clock, the probe."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from bench import PredictedTimeout
from bench.matrix import DEFAULT_CONFIG, Regime
from bench.measure import StepClock, summarise
from bench.probe import cpu_torch_adamw, disk, host_memory
from bench.runners import Cell, Steps, _PredictedTimeoutGuard, deepspeed_config, lightning, run_loop
from lightning_offload.planner import Ceilings


def _cell(**regime) -> Cell:
    fields = {"name": "test", "micro_batch": 1, "seq": 8, "accumulate": 1, "steps": 3, "warmup": 1, **regime}
    return Cell("tiny", Regime(**fields), torch.device("cpu"))


def test_a_loop_step_is_every_micro_batch_then_one_update():
    calls, losses = [], iter(range(1, 9))

    def micro_batch(batch: torch.Tensor, scale: float) -> torch.Tensor:
        calls.append(("micro", tuple(batch.shape), scale))
        return torch.tensor(float(next(losses)))

    clock = run_loop(_cell(accumulate=4, micro_batch=2, steps=2), Steps(micro_batch, lambda: calls.append("step")))
    assert calls[:5] == [("micro", (2, 8), 0.25)] * 4 + ["step"]
    assert len(calls) == 10 and len(clock.times) == 2
    assert clock.losses == [2.5, 6.5]  # mean over each step's micro-batches


def test_steady_figures_leave_out_warmup_and_show_stalls_in_the_mean():
    times = [5.0, 2.0, 1.0, 1.0, 4.0, 1.0]
    figures = summarise(times, [11.0, 10.5], warmup=2, tokens_per_step=8192, matmul_params=10**9)
    assert figures["step_s_median"] == 1.0 and figures["step_s_mean"] == 1.75
    assert figures["tokens_per_s"] == 8192 and figures["model_tflops"] == pytest.approx(6 * 8192 * 1e9 / 1e12, 0.1)
    assert (figures["loss_first"], figures["loss_last"]) == (11.0, 10.5)


def test_lightning_clock_times_optimizer_steps_and_undoes_the_loss_division():
    clock = lightning(_cell(accumulate=2, steps=2), strategy="auto", checkpointing="reentrant", optimizer="adamw")
    assert len(clock.times) == 2
    # Random tokens over a 32000-word vocabulary: the loss starts near ln(32000) = 10.4, not 10.4 / 2.
    assert all(10 < loss < 11 for loss in clock.losses)


def test_probe_cpu_measurements_report_the_keys_the_limits_read(tmp_path):
    figures = {**host_memory(0.02), **cpu_torch_adamw(0.5), **disk(0.02, str(tmp_path))}
    assert set(figures) == {"host_copy_GBps", "cpu_adamw_fused_Gparam_per_s", "cpu_adamw_foreach_Gparam_per_s",
                            "disk_write_GBps", "disk_read_GBps"}
    assert all(value > 0 for value in figures.values())
    assert not list(tmp_path.iterdir())


def test_step_clock_on_cpu_needs_no_cuda():
    clock = StepClock(torch.device("cpu"))
    clock.start()
    clock.stop([torch.tensor(1.0), torch.tensor(3.0)])
    assert clock.losses == [2.0] and clock.times[0] >= 0


def test_deepspeed_direct_config_matches_the_anchor_and_the_regime():
    config = deepspeed_config(_cell(micro_batch=4, accumulate=8).regime, zenflow=True)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (4, 8)
    zero = config["zero_optimization"]
    assert zero["stage"] == 2 and zero["overlap_comm"] and zero["reduce_bucket_size"] == 5e8
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert {key: zero["zenflow"][key] for key in ("topk_ratio", "update_interval", "overlap_step")} == {
        "topk_ratio": 0.05, "update_interval": 4, "overlap_step": True}
    assert "zenflow" not in deepspeed_config(_cell().regime, zenflow=False)["zero_optimization"]


@pytest.mark.slow  # DeepSpeed JIT-builds its CPU Adam (~60 s) the first time on a machine
def test_single_gpu_offload_row_trains_on_the_cpu():
    pytest.importorskip("lightning_offload")
    clock = lightning(_cell(accumulate=2, steps=2), strategy="single_gpu_offload", checkpointing="non_reentrant",
                      optimizer="adamw", backend="deepspeed")
    assert len(clock.times) == 2 and all(10 < loss < 11 for loss in clock.losses)


def test_gpu_8bit_row_trains_on_the_cpu_with_the_chunked_loss():
    from bench.methods import all_methods

    method = all_methods({"gpu_8bit": "gpu_fused_8bit_adamw"})["single_gpu_offload_gpu_8bit"]
    assert method.options["loss"] == "chunked" and method.options["checkpointing"] == "by_strategy"
    clock = lightning(_cell(accumulate=2, steps=2), **method.options)
    assert len(clock.times) == 2 and all(10 < loss < 11 for loss in clock.losses)


def test_host_adam_rows_leave_checkpointing_to_the_planner_and_one_keeps_every_state_on_the_host():
    from bench.methods import all_methods

    methods = all_methods({"host_adam": "host_adam"})
    planned, all_host = methods["single_gpu_offload_host_adam"], methods["single_gpu_offload_host_adam_all_host"]
    assert planned.options["loss"] == "chunked" and planned.options["checkpointing"] == "by_strategy"
    assert "backend_options" not in planned.options
    assert all_host.options == {**planned.options,
                                "backend_options": {"gpu_state_blocks": 0, "cast_on_device": False}}
    cast_on_host = methods["single_gpu_offload_host_adam_cast_on_host"]
    assert cast_on_host.options == {**planned.options, "backend_options": {"cast_on_device": False}}
    clock = lightning(_cell(accumulate=2, steps=2), **all_host.options)
    assert len(clock.times) == 2 and all(10 < loss < 11 for loss in clock.losses)
    # The record keeps the plan's prediction and the ceilings it was costed at.
    assert clock.planned["plan"].startswith("host_adam") and clock.planned["predicted_step_s"] > 0
    assert clock.planned["planner_ceilings"]["cpu_adamw_gparams"] > 0
    assert "0 blocks' state on the GPU" in clock.planned["plan"]


def _trainer_with_plan(step_time_s: float | None) -> SimpleNamespace:
    chosen = SimpleNamespace(plan="fsdp + adamw8bit + checkpointing=full", step_time_s=step_time_s,
                             memory=SimpleNamespace(gpu_bytes=30 * 2**30, host_bytes=90 * 2**30))
    report = None if step_time_s is None else SimpleNamespace(chosen=chosen, ceilings=Ceilings())
    return SimpleNamespace(strategy=SimpleNamespace(plan_report=report))


def test_the_guard_stops_a_plan_predicted_to_overrun_the_time_left_and_only_that():
    guard = _PredictedTimeoutGuard(steps=8, deadline=time.time() + 380.4)
    with pytest.raises(PredictedTimeout) as refused:
        guard.on_train_start(_trainer_with_plan(133.0), None)
    assert str(refused.value) == ("fsdp + adamw8bit + checkpointing=full at 133 s/step needs ~1064 s for 8 steps, "
                                  "380 s left")
    assert refused.value.planned == {
        "plan": "fsdp + adamw8bit + checkpointing=full", "predicted_step_s": 133.0, "predicted_gpu_gib": 30.0,
        "predicted_host_gib": 90.0, "planner_ceilings": {"matmul_tflops": 773.0, "h2d_gbps": 46.7, "d2h_gbps": 55.0,
                                                         "duplex_gbps": 78.5, "cpu_adamw_gparams": 3.9}}
    guard.on_train_start(_trainer_with_plan(47.0), None)  # 376 s of steps fit in 380 s
    guard.on_train_start(_trainer_with_plan(None), None)  # no plan (not lightning_offload): nothing to predict
    _PredictedTimeoutGuard(steps=8, deadline=time.time() + 1100).on_train_start(_trainer_with_plan(133.0), None)


def test_a_cell_past_its_time_limit_is_stopped_at_train_start_and_recorded_as_a_timeout_with_its_plan():
    from bench.cell import measure_cell
    from bench.run import ChildOutcome, classify

    overrides = {"steps": 2, "warmup": 1, "seq": 8, "micro_batch": 1}
    result = measure_cell("single_gpu_offload_host_adam_all_host", "tiny", "r1", "cpu", DEFAULT_CONFIG, overrides,
                          deadline=time.time())
    assert not result["ok"] and "step_times" not in result
    assert "0 blocks' state on the GPU" in result["plan"] and result["predicted_step_s"] > 0
    status, cause = classify(ChildOutcome(1, False, result, "", 0, 1.0), 420)
    assert status == "timeout" and cause.startswith("predicted timeout: host_adam + ")
