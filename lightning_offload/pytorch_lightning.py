"""The strategies and `ThroughputMonitor` for `pytorch_lightning` (``import pytorch_lightning as pl``)."""

from pytorch_lightning import Callback
from pytorch_lightning.strategies import ParallelStrategy, SingleDeviceStrategy

from lightning_offload.parallel import _OffloadCore
from lightning_offload.strategy import _SingleGPUOffloadCore
from lightning_offload.telemetry import _ThroughputMonitorCore


class ThroughputMonitor(_ThroughputMonitorCore, Callback):
    __doc__ = _ThroughputMonitorCore.__doc__


class SingleGPUOffloadStrategy(_SingleGPUOffloadCore, SingleDeviceStrategy):
    __doc__ = _SingleGPUOffloadCore.__doc__
    _lightning = "pytorch_lightning"
    _telemetry_callback = ThroughputMonitor


class OffloadStrategy(_OffloadCore, ParallelStrategy):
    __doc__ = _OffloadCore.__doc__
    _lightning = "pytorch_lightning"
    _telemetry_callback = ThroughputMonitor
