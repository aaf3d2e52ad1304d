"""Repeated fits in one process on a CUDA device: a run's pinned host memory and GPU memory are released by the next
fit, whatever backend either used, or as soon as the user drops its model and Trainer."""

from __future__ import annotations

import gc

import pytest
import torch

from lightning_offload.telemetry import pinned_host_bytes
from tests.test_repeated_runs import ModerateLM, settled_rss, seeded_fit

pytestmark = pytest.mark.gpu

# Each backend at the precision it trains with on a GPU.
GPU_BACKENDS = {"device": "bf16-mixed", "host_adam": "bf16-mixed", "stream": "bf16-true", "deepspeed": "bf16-mixed",
                "fsdp": "bf16-mixed", "gpu_8bit": "bf16-mixed"}


def held_memory() -> dict[str, int]:
    """Host RSS (page-locked arenas registered with `cudaHostRegister` included), torch's pinned host blocks in use,
    and GPU memory in use."""
    gc.collect()
    torch.cuda.synchronize()
    return {"rss": settled_rss(), "pinned": pinned_host_bytes() or 0, "gpu": torch.cuda.memory_allocated()}


def gpu_fit(backend: str) -> None:
    seeded_fit(backend, module=ModerateLM(), num_batches=1, accelerator="cuda", precision=GPU_BACKENDS[backend])


@pytest.mark.parametrize("backend", list(GPU_BACKENDS))
def test_memory_of_a_run_is_released_by_the_next(backend: str) -> None:
    parameters = sum(p.numel() for p in ModerateLM().net_for_counting().parameters())
    runs = []
    for _ in range(3):
        gpu_fit(backend)
        runs.append(held_memory())
    # As on the CPU (tests/test_repeated_runs.py): one run's optimizer state left behind (12 bytes per parameter) is
    # four times this tolerance; what the first fit pays once (CUDA context, kernels) is not compared.
    tolerance = 3 * parameters
    for kind in runs[0]:
        assert runs[2][kind] - runs[1][kind] < tolerance, (kind, [run[kind] / 2**20 for run in runs])


@pytest.mark.parametrize("backend", ["host_adam", "stream", "deepspeed"])
def test_a_fit_with_another_backend_releases_pinned_and_gpu_memory(backend: str) -> None:
    gpu_fit("device")
    alone = held_memory()
    gpu_fit(backend)
    gpu_fit("device")
    after = held_memory()
    tolerance = 3 * sum(p.numel() for p in ModerateLM().net_for_counting().parameters())
    for kind in ("pinned", "gpu"):
        assert after[kind] - alone[kind] < tolerance, (kind, alone[kind] / 2**20, after[kind] / 2**20)


@pytest.mark.parametrize("backend", ["host_adam", "stream", "deepspeed"])
def test_a_run_the_user_drops_frees_its_memory_without_another_fit(backend: str) -> None:
    # A first run pays the backend's lazy imports and kernels; the device run releases it where dropping does not.
    gpu_fit(backend)
    gpu_fit("device")
    alone = held_memory()
    module, trainer = seeded_fit(backend, module=ModerateLM(), num_batches=1, accelerator="cuda",
                                 precision=GPU_BACKENDS[backend])
    del module, trainer
    after = held_memory()
    tolerance = 3 * sum(p.numel() for p in ModerateLM().net_for_counting().parameters())
    for kind in after:
        assert after[kind] - alone[kind] < tolerance, (kind, alone[kind] / 2**20, after[kind] / 2**20)
