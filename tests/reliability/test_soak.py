"""A long CPU run does not leak: host memory and open file descriptors stay flat over 1,000 steps."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import lightning.pytorch as pl
import pytest

from lightning_offload import SingleGPUOffloadStrategy
from tests.conftest import TinyLM, fit

STEPS, WARMUP_STEPS = 1000, 100
MAX_RSS_GROWTH = 0.05


def _rss_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


class _Sampler(pl.Callback):
    def __init__(self) -> None:
        self.samples: dict[int, tuple[int, int]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in (WARMUP_STEPS, STEPS):
            self.samples[trainer.global_step] = (_rss_bytes(), _open_descriptors())


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc")
def test_a_thousand_steps_keep_memory_and_descriptors_flat() -> None:
    # host_adam: the engine with the most moving parts per step (a worker thread, buffer queues, hooks).
    sampler = _Sampler()
    fit(SingleGPUOffloadStrategy(backend="host_adam", check_memory=False, telemetry=False, bucket_numel=3000,
                                 chunk_numel=700),
        num_batches=STEPS, batch_size=1, module=TinyLM(lr=1e-4), callbacks=[sampler], log_every_n_steps=50)
    (rss_before, fds_before), (rss_after, fds_after) = sampler.samples[WARMUP_STEPS], sampler.samples[STEPS]
    assert rss_after <= rss_before * (1 + MAX_RSS_GROWTH), (rss_before, rss_after)
    assert fds_after <= fds_before
