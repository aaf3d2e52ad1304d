"""The planner still runs before every conformance run (its invisibility is under test), on a fixed machine: the
free host memory of a shared CPU runner would otherwise decide whether a tiny module fits."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest
import torch

from lightning_offload.planner import Machine

# Roomy enough for every plan of the suite's tiny modules; a GPU keeps its measured memory.
CPU_MACHINE = Machine(gpu_memory_gib=16.0, host_memory_gib=16.0, unified=True)


@pytest.fixture(autouse=True)
def _fixed_cpu_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    detect = Machine.detect.__func__

    def fixed_on_cpu(cls: type[Machine], device: torch.device | None = None, **budgets: float | None) -> Machine:
        on_gpu = (device or torch.device("cuda" if torch.cuda.is_available() else "cpu")).type == "cuda"
        return detect(cls, device, **budgets) if on_gpu else CPU_MACHINE

    monkeypatch.setattr(Machine, "detect", classmethod(fixed_on_cpu))


@pytest.fixture(autouse=True, scope="session")
def _cpu_info_asked_once() -> Iterator[None]:
    """DeepSpeedCPUAdam asks py-cpuinfo (a subprocess of a second or more) for the CPU's flags at every construction;
    they do not change within a test session."""
    import cpuinfo

    asked = cpuinfo.get_cpu_info
    cpuinfo.get_cpu_info = functools.cache(asked)
    yield
    cpuinfo.get_cpu_info = asked
