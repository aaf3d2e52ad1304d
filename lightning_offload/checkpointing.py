"""Deprecated: `lightning_offload.activation_checkpointing`, under its former name for one release."""

import sys
import warnings

from lightning_offload import activation_checkpointing

warnings.warn("`lightning_offload.checkpointing` is deprecated and will be removed in the next release; import "
              "`lightning_offload.activation_checkpointing` instead.", DeprecationWarning, stacklevel=2)
# The old name is the new module itself, so its objects (and changes made to them) are the same ones.
sys.modules[__name__] = activation_checkpointing
