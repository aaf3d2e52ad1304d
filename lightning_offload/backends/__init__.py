"""Engines behind `SingleGPUOffloadStrategy`, one module or package each, imported only when asked for by name
(`registry.py`); each one's `SPEC` (`spec.py`) holds what differs per backend."""

from lightning_offload.backends.registry import available_backends, backend_class

__all__ = ["available_backends", "backend_class"]
