"""lightning_offload: train models larger than the GPU's memory on one GPU, from an unchanged LightningModule.

``import lightning_offload`` registers ``strategy="single_gpu_offload"`` (and ``"single_gpu_offload_<backend>"``),
and its several-device form ``strategy="offload"`` (``"offload_<backend>"``), with the Trainers of both
``lightning.pytorch`` and ``pytorch_lightning``. Import it before building the Trainer:
the Trainer reads the registry when it is constructed. Engines (DeepSpeed, bitsandbytes) load when a fit starts.
"""

from importlib.util import find_spec

from lightning.pytorch.core import saving as _lightning_saving
from lightning.pytorch.strategies import StrategyRegistry as _LightningRegistry

from lightning_offload.export import export_hf
from lightning_offload.parallel import OffloadStrategy
from lightning_offload.planner import Machine, plan
from lightning_offload.pretrained import pretrained
from lightning_offload.consolidation import consolidate, read_checkpoint_folders
from lightning_offload.strategy import MULTI_DEVICE_NAME, STRATEGY_NAME, SingleGPUOffloadStrategy

# `plan` is the planner's function; `lightning-offload plan` is its command.
__all__ = ["MULTI_DEVICE_NAME", "STRATEGY_NAME", "Machine", "OffloadStrategy", "SingleGPUOffloadStrategy",
           "consolidate", "export_hf", "plan", "pretrained"]
__version__ = "0.1.0"

SingleGPUOffloadStrategy.register_strategies(_LightningRegistry)
OffloadStrategy.register_strategies(_LightningRegistry)
# `MyModule.load_from_checkpoint(path)` reads the engines' checkpoint folders too.
read_checkpoint_folders(_lightning_saving)

if find_spec("pytorch_lightning") is not None:
    from pytorch_lightning.core import saving as _pytorch_lightning_saving
    from pytorch_lightning.strategies import StrategyRegistry as _PytorchLightningRegistry

    from lightning_offload.pytorch_lightning import OffloadStrategy as _PytorchLightningOffload
    from lightning_offload.pytorch_lightning import SingleGPUOffloadStrategy as _PytorchLightningStrategy

    _PytorchLightningStrategy.register_strategies(_PytorchLightningRegistry)
    _PytorchLightningOffload.register_strategies(_PytorchLightningRegistry)
    read_checkpoint_folders(_pytorch_lightning_saving)
