"""`SingleGPUOffloadStrategy` for the `pytorch_lightning` namespace (``import pytorch_lightning as pl``)."""

from pytorch_lightning.strategies import SingleDeviceStrategy

from lightning_offload.strategy import _SingleGPUOffloadCore


class SingleGPUOffloadStrategy(_SingleGPUOffloadCore, SingleDeviceStrategy):
    __doc__ = _SingleGPUOffloadCore.__doc__
    _lightning = "pytorch_lightning"
