"""Building the user's model with its parameters on the meta device and its buffers computed for real.

Under `torch.device("meta")` a module's constructor computes its buffers (rotary frequencies, a causal mask, a cached
table) on meta too, and only an initialiser that recomputes them could bring them back. Here, as in accelerate's
`init_empty_weights`, each parameter moves to meta as it is registered while everything else is built in host memory:
buffers come out as under `strategy="auto"`. What the build cannot know stays on meta for the module's initialiser, as
before: a buffer computed from a parameter, or drawn at random.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils.weak import WeakIdKeyDictionary

_IN_PLACE_OPERATORS = re.compile(r"__i(add|sub|mul|truediv|floordiv|mod|pow|and|or|xor|lshift|rshift|matmul)__")


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside, every parameter a module registers moves to the meta device (its class, attributes and `requires_grad`
    kept, its host memory never touched), and the buffers are computed in host memory by their constructors.

    No number drawn from the global random generator survives the build, as none is drawn under `torch.device("meta")`:
    the engine's initialisers draw the parameters' numbers later, where each unit gets its memory. A buffer the build
    wrote from a meta tensor or filled at random is left on meta for its module's initialiser.
    """
    build = _Build()
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def register_parameter_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register_parameter(module, name, param)
        if param is not None and not param.is_meta:
            on_meta = type(param)(param.detach().to("meta"), requires_grad=param.requires_grad)
            on_meta.__dict__.update(param.__dict__)
            module._parameters[name] = on_meta

    def register_buffer_seen(module: nn.Module, name: str, tensor: torch.Tensor | None,
                             persistent: bool = True) -> None:
        register_buffer(module, name, tensor, persistent)
        build.modules.add(module)

    nn.Module.register_parameter = register_parameter_on_meta  # type: ignore[method-assign]
    nn.Module.register_buffer = register_buffer_seen  # type: ignore[method-assign]
    try:
        with build:
            yield
    finally:
        nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
        nn.Module.register_buffer = register_buffer  # type: ignore[method-assign]
    build.leave_unknown_buffers_on_meta()


class _Build(TorchFunctionMode):
    """Runs an operation that reads a meta tensor on meta; one that would write its result into a host tensor, or
    that drew from the global generator, is undone and its host tensor marked unknown."""

    def __init__(self) -> None:
        super().__init__()
        self.modules: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self.unknown: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        written = _written(func, args, kwargs)
        if any(isinstance(t, torch.Tensor) and self._is_unknown(t) for t in pytree.tree_leaves((args, kwargs))):
            if written is not None and not written.is_meta:
                self.unknown[written] = True
                return written
            args, kwargs = pytree.tree_map_only(torch.Tensor, self._on_meta, (args, kwargs))
            return func(*args, **kwargs)
        random_state = torch.get_rng_state()
        result = func(*args, **kwargs)
        if not torch.equal(random_state, torch.get_rng_state()):
            torch.set_rng_state(random_state)
            drawn = [written] if written is not None else pytree.tree_leaves(result)
            for tensor in drawn:
                if isinstance(tensor, torch.Tensor) and not tensor.is_meta:
                    self.unknown[tensor] = True
        return result

    def _is_unknown(self, tensor: torch.Tensor) -> bool:
        return tensor.is_meta or tensor in self.unknown

    def _on_meta(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if tensor.is_meta else tensor.to("meta")

    def leave_unknown_buffers_on_meta(self) -> None:
        for module in self.modules:
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer in self.unknown:
                    module._buffers[name] = torch.empty_like(buffer, device="meta")


def _written(func: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The tensor an in-place operation (or one given `out=`) writes into."""
    name = getattr(func, "__name__", "")
    in_place = (name.endswith("_") and not name.startswith("_")) or name == "__setitem__" or \
        _IN_PLACE_OPERATORS.fullmatch(name) is not None
    if in_place and args and isinstance(args[0], torch.Tensor):
        return args[0]
    out = kwargs.get("out")
    return out if isinstance(out, torch.Tensor) else None
