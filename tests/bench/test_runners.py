"""Timing and measuring shared by every method, checked on the CPU: loops, the Lightning clock, the probe."""

from __future__ import annotations

import pytest
import torch

from bench.matrix import Regime
from bench.measure import StepClock, summarise
from bench.probe import cpu_torch_adamw, disk, host_memory
from bench.runners import Cell, Steps, deepspeed_config, lightning, run_loop


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
    assert all_host.options == {**planned.options, "backend_options": {"gpu_state_blocks": 0}}
    clock = lightning(_cell(accumulate=2, steps=2), **all_host.options)
    assert len(clock.times) == 2 and all(10 < loss < 11 for loss in clock.losses)
    assert "0 blocks' state on the GPU" in clock.planned["plan"]
