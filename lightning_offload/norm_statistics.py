"""Normalization layers whose weights an engine keeps in bf16 while their running statistics stay fp32.

`host_adam` and `deepspeed` put bf16 weights on the GPU under `bf16-mixed`, but a BatchNorm's running mean and
variance are buffers the engines leave in fp32, and `batch_norm` refuses a weight whose dtype differs from its running
statistics. Casting the statistics would change the module's state (and its checkpoints); instead such a layer's
forward sees its weight and bias cast up to the statistics' dtype, the mixed form `batch_norm` accepts (bf16 input,
fp32 parameters), as under a plain `bf16-mixed` run. Gradients reach the bf16 parameters through the cast.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

_WRAPPED = "_lightning_offload_norm_statistics"


def match_norm_weights_to_statistics(module: nn.Module) -> int:
    """Wraps the forward of every normalization layer of `module` that tracks running statistics; returns how many.
    A wrapped layer whose weight already has its statistics' dtype runs its own forward unchanged."""
    wrapped = 0
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._NormBase) and layer.track_running_stats \
                and not getattr(layer, _WRAPPED, False):
            _wrap(layer)
            wrapped += 1
    return wrapped


def _wrap(layer: nn.modules.batchnorm._NormBase) -> None:
    forward = layer.forward

    @functools.wraps(forward)
    def cast_weights_forward(*args: Any, **kwargs: Any) -> Any:
        weight, statistics = layer.weight, layer.running_mean
        if weight is None or statistics is None or weight.dtype == statistics.dtype:
            return forward(*args, **kwargs)
        # Swapped in the parameter dict for this call only (not through `layer(...)`: an engine's hooks on the layer
        # have run already and must not run twice).
        own = {name: layer._parameters[name] for name in ("weight", "bias") if layer._parameters.get(name) is not None}
        try:
            for name, parameter in own.items():
                layer._parameters[name] = parameter.to(statistics.dtype)
            return forward(*args, **kwargs)
        finally:
            layer._parameters.update(own)

    layer.forward = cast_weights_forward
    setattr(layer, _WRAPPED, True)
