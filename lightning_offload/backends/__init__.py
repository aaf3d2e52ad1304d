"""Engines behind `SingleGPUOffloadStrategy`, one module each, imported only when chosen."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning_offload.backends.base import Backend

# name -> "module:class"; the engine's heavy imports happen inside that module's methods.
_BACKENDS = {
    "deepspeed": "lightning_offload.backends.deepspeed:DeepSpeedBackend",
    "device": "lightning_offload.backends.device:DeviceBackend",
    "fsdp": "lightning_offload.backends.fsdp:FSDPBackend",
    "gpu_8bit": "lightning_offload.backends.gpu_8bit:GPU8bitBackend",
    "host_adam": "lightning_offload.backends.host_adam:HostAdamBackend",
    "stream": "lightning_offload.backends.stream:StreamBackend",
}


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def backend_class(name: str) -> type[Backend]:
    if name not in _BACKENDS:
        raise ValueError(f"Unknown backend {name!r}. Choose one of {['auto', *available_backends()]}.")
    module_name, class_name = _BACKENDS[name].split(":")
    return getattr(import_module(module_name), class_name)
