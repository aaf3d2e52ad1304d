"""Telemetry: the strategy adds one monitor per Trainer, and its figures agree with independent measurements.

Independent here means measured outside the monitor: a clock read in a separate callback, tokens counted from the
data loader's shapes, parameters counted from the network's layers, RSS read from `/proc/self/status`, GPU memory
from `torch.cuda` after the fit. Agreement is required within 5%.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

from lightning_offload import SingleGPUOffloadStrategy
from lightning_offload.backends.device import DeviceBackend
from lightning_offload.models import TinyGPT
from lightning_offload.telemetry import GIB, ThroughputMonitor, bf16_peak_tflops, count_tokens
from tests.conftest import BATCH, SEQ_LEN, VOCAB, TinyLM, fit, token_batches

TOLERANCE = 0.05
TOKENS_PER_BATCH = BATCH * SEQ_LEN


class RecordingLogger(Logger):
    """Keeps every logged row in memory, as any Lightning logger receives it."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Hyperparameters are not under test."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append(dict(metrics))

    def column(self, name: str) -> list[float]:
        return [row[name] for row in self.rows if name in row]


class WallClock(pl.Callback):
    """The independent clock: a timestamp at the end of every batch, and the RSS and pinned host memory there (the
    engines free pinned buffers at teardown, so after the fit is too late to read them)."""

    def __init__(self) -> None:
        self.batch_ends: list[float] = []
        self.rss_bytes = 0
        self.pinned_bytes = 0

    def on_train_batch_end(self, *args: Any) -> None:
        self.batch_ends.append(time.perf_counter())
        status = Path("/proc/self/status").read_text()
        self.rss_bytes = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024
        if torch.cuda.is_initialized():
            self.pinned_bytes = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)


def monitors(trainer: pl.Trainer) -> list[Any]:
    return [c for c in trainer.callbacks if type(c).__name__ == "ThroughputMonitor"]


def layer_parameters(module: TinyLM) -> int:
    """Parameters of the blocks and the final norm: TinyGPT's output layer shares the embedding's weight."""
    net = module.net
    return sum(p.numel() for p in net.blocks.parameters()) + sum(p.numel() for p in net.norm.parameters())


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100-PCIE-40GB", 312.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA GeForce RTX 4090", 165.2), ("NVIDIA H100 NVL", None), ("NVIDIA L4", None), ("Tesla T4", None),
])
def test_bf16_peak_by_device_name_and_unknown_devices_get_none(name: str, peak: float | None) -> None:
    assert bf16_peak_tflops(name) == peak


def test_tokens_are_counted_from_the_first_tensor_or_input_ids() -> None:
    tokens = torch.zeros(4, 16, dtype=torch.long)
    assert count_tokens((tokens, tokens)) == count_tokens({"input_ids": tokens, "labels": tokens}) == 64


def test_default_strategy_adds_one_monitor_and_a_second_fit_keeps_it() -> None:
    module, trainer = fit("single_gpu_offload", num_batches=3)
    (monitor,) = monitors(trainer)
    assert len(monitor.step_seconds) == 3
    trainer.fit_loop.max_epochs = 2
    trainer.fit(module, train_dataloaders=token_batches(3))
    assert monitors(trainer) == [monitor] and len(monitor.step_seconds) == 3


def test_a_monitor_passed_by_the_user_is_not_doubled_and_the_flag_turns_it_off() -> None:
    mine = ThroughputMonitor(prog_bar=False)
    _, trainer = fit(SingleGPUOffloadStrategy(backend="device"), num_batches=2, callbacks=[mine])
    assert monitors(trainer) == [mine] and len(mine.step_seconds) == 2
    _, trainer = fit(SingleGPUOffloadStrategy(backend="device", telemetry=False), num_batches=2)
    assert monitors(trainer) == []


def test_pytorch_lightning_trainer_gets_its_own_namespace_monitor() -> None:
    pytorch_lightning = pytest.importorskip("pytorch_lightning")
    from lightning_offload.pytorch_lightning import SingleGPUOffloadStrategy as Strategy

    class Regression(pytorch_lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=0.1)

    x = torch.randn(16, 4)
    trainer = pytorch_lightning.Trainer(strategy=Strategy(backend="device"), accelerator="cpu", max_steps=2,
                                        logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(Regression(), DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8))
    (monitor,) = monitors(trainer)
    assert isinstance(monitor, pytorch_lightning.Callback) and monitor.step_tokens == [32, 32]


def test_logged_throughput_flops_and_rss_agree_with_independent_measurements() -> None:
    logger, clock = RecordingLogger(), WallClock()
    module, trainer = fit(SingleGPUOffloadStrategy(backend="device"), num_batches=30, logger=logger,
                          log_every_n_steps=1, callbacks=[clock])
    tokens_per_s = logger.column("perf/tokens_per_s")
    assert len(tokens_per_s) == 30
    # Steps 2..30 (the first has no earlier batch end on the independent clock).
    logged_seconds = sum(TOKENS_PER_BATCH / rate for rate in tokens_per_s[1:])
    wall_seconds = clock.batch_ends[-1] - clock.batch_ends[0]
    assert logged_seconds == pytest.approx(wall_seconds, rel=TOLERANCE)

    flops_per_token = 6 * layer_parameters(module)
    for rate, tflops in zip(tokens_per_s, logger.column("perf/model_tflops")):
        assert tflops == pytest.approx(flops_per_token * rate / 1e12, rel=1e-4)
    assert "perf/mfu" not in logger.rows[-1]  # no known peak for a CPU: left out, not guessed

    assert logger.column("mem/host_rss_gib")[-1] == pytest.approx(clock.rss_bytes / GIB, rel=TOLERANCE)
    summary = monitors(trainer)[0].summary()
    assert summary["tokens_per_s"] == pytest.approx(TOKENS_PER_BATCH * 28 / sum(monitors(trainer)[0].step_seconds[2:]))


class SlowValidationLM(TinyLM):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        time.sleep(0.25)  # stands for a validation pass long enough to show up in the step times


def test_accumulated_micro_batches_make_one_step_and_validation_is_not_counted() -> None:
    logger, clock = RecordingLogger(), WallClock()
    trainer = pl.Trainer(strategy=SingleGPUOffloadStrategy(backend="device"), accelerator="cpu", max_epochs=1,
                         logger=logger, log_every_n_steps=1, callbacks=[clock], accumulate_grad_batches=2,
                         val_check_interval=4, limit_val_batches=1, num_sanity_val_steps=0,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(SlowValidationLM(), train_dataloaders=token_batches(12), val_dataloaders=token_batches(1))
    monitor = monitors(trainer)[0]
    assert monitor.step_tokens == [2 * TOKENS_PER_BATCH] * 6
    assert len(logger.column("perf/tokens_per_s")) == 6
    validations, pause_s = 2, 0.25  # after batches 4 and 8; the one after batch 12 ends the fit
    wall_seconds = clock.batch_ends[-1] - clock.batch_ends[0]
    assert sum(monitor.step_seconds[1:]) < wall_seconds - 0.8 * pause_s * validations


class CountingBackend(DeviceBackend):
    """A backend that knows what it moves: 1 MiB to the device per backward, for the test."""

    def __init__(self) -> None:
        super().__init__(DeviceBackend.Config())
        self.moved = 0

    def before_backward(self, last_micro_batch: bool) -> None:
        self.moved += 2**20

    def transfer_counters(self) -> dict[str, int]:
        return {"host_to_device": self.moved}


def test_bytes_a_backend_counts_are_logged_per_step() -> None:
    strategy, logger = SingleGPUOffloadStrategy(backend="device"), RecordingLogger()
    strategy.backend = CountingBackend()
    _, trainer = fit(strategy, num_batches=6, logger=logger, log_every_n_steps=1, accumulate_grad_batches=2)
    assert logger.column("pcie/host_to_device_gib") == [2 * 2**20 / GIB] * 3
    assert monitors(trainer)[0].summary()["pcie_host_to_device_gib"] == pytest.approx(6 * 2**20 / GIB)


@pytest.mark.gpu
def test_gpu_figures_agree_with_torch_cuda() -> None:
    logger, clock = RecordingLogger(), WallClock()
    # DeepSpeed keeps pinned host buffers, so the pinned-memory figure has something to agree with.
    fit(SingleGPUOffloadStrategy(backend="deepspeed"), num_batches=20, precision="bf16-mixed", accelerator="cuda",
        logger=logger, log_every_n_steps=1, callbacks=[clock])
    tokens_per_s = logger.column("perf/tokens_per_s")
    logged_seconds = sum(TOKENS_PER_BATCH / rate for rate in tokens_per_s[1:])
    assert logged_seconds == pytest.approx(clock.batch_ends[-1] - clock.batch_ends[0], rel=TOLERANCE)
    torch_peak = torch.cuda.max_memory_allocated() / GIB
    assert logger.column("mem/gpu_peak_gib")[-1] == pytest.approx(torch_peak, rel=TOLERANCE)
    device_peak = logger.column("mem/gpu_device_peak_gib")[-1]
    assert torch_peak <= device_peak <= torch.cuda.mem_get_info()[1] / GIB
    pinned = clock.pinned_bytes / GIB
    assert pinned > 0 and logger.column("mem/pinned_host_gib")[-1] == pytest.approx(pinned, rel=TOLERANCE)
    known_peak = bf16_peak_tflops(torch.cuda.get_device_name())
    assert ("perf/mfu" in logger.rows[-1]) == (known_peak is not None)
    assert logger.column("mem/host_rss_gib")[-1] == pytest.approx(clock.rss_bytes / GIB, rel=TOLERANCE)


def per_step_bytes(logger: RecordingLogger, direction: str) -> list[int]:
    return [round(gib * GIB) for gib in logger.column(f"pcie/{direction}_gib")]


def test_the_stream_engine_reports_the_bytes_its_copy_lanes_move() -> None:
    from tests.backends.test_stream import stream

    logger = RecordingLogger()
    _, trainer = fit(stream(), precision="bf16-true", num_batches=4, logger=logger, log_every_n_steps=1)
    units = trainer.strategy.backend.units
    # Each step every unit's 8-bit state goes back to the host once, with the updated weights of the streamed ones.
    state_and_streamed_weights = sum(u.state_bytes + (u.weight_bytes if u.streamed else 0) for u in units)
    assert any(u.streamed for u in units)
    assert per_step_bytes(logger, "device_to_host") == [state_and_streamed_weights] * 4
    # Coming in: the same state, and the streamed weights for forward and again for backward (some kept in slots).
    assert all(b > sum(u.state_bytes for u in units) for b in per_step_bytes(logger, "host_to_device"))


def test_the_host_adam_engine_reports_gradients_out_and_weights_back() -> None:
    from tests.backends.host_adam.test_backend import host_adam

    logger = RecordingLogger()
    module, trainer = fit(host_adam(), num_batches=4, logger=logger, log_every_n_steps=1)
    backend = trainer.strategy.backend
    backend.engine.wait_all()  # the host finishes a step's last buckets while the next step runs
    fp32_bytes = 4 * sum(p.numel() for p in module.parameters())  # every parameter stepped on the host
    assert backend.transfer_counters() == {"device_to_host": 4 * fp32_bytes, "host_to_device": 4 * fp32_bytes}
    for direction in ("device_to_host", "host_to_device"):
        assert 0 < sum(per_step_bytes(logger, direction)) <= 4 * fp32_bytes


class FourBlockLM(TinyLM):
    """Four blocks: the offload copies the first ones out during forward and back during backward."""

    def configure_model(self) -> None:
        if self.net is None:
            torch.manual_seed(self.hparams.init_seed)
            self.net = TinyGPT(vocab_size=VOCAB, d_model=32, n_layers=4, n_heads=2, max_seq_len=SEQ_LEN)


def test_activation_offload_reports_its_copies_out_and_back() -> None:
    from lightning_offload.activation_checkpointing import activation_offloader

    logger = RecordingLogger()
    offload = {"policy": "offload", "offload_min_bytes": 0}  # the tiny model's activations are a few KiB
    module, _ = fit(SingleGPUOffloadStrategy(backend="device", activation_checkpointing=offload),
                    module=FourBlockLM(), num_batches=4, logger=logger, log_every_n_steps=1)
    offloader = activation_offloader(module)
    out, back = per_step_bytes(logger, "device_to_host"), per_step_bytes(logger, "host_to_device")
    assert sum(out) == offloader.copied_out_bytes > 0 and sum(back) == offloader.copied_back_bytes > 0
    assert len(out) == len(back) == 4 and len(set(out)) == len(set(back)) == 1  # the same copies every step
