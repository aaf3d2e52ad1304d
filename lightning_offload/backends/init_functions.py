"""`torch.nn.init` as the strategy's engines see it while the user's model is built."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

InitFunction = Callable[..., Any]


@contextmanager
def wrapped_init_functions(wrap: Callable[[InitFunction], InitFunction]) -> Iterator[None]:
    """Inside, every in-place `torch.nn.init.*_` function is `wrap(function)`, wherever it was imported by name."""
    originals = {
        name: function for name, function in vars(torch.nn.init).items()
        if name.endswith("_") and not name.startswith("_") and callable(function)
    }
    wrapped = {id(function): wrap(function) for function in originals.values()}
    # transformers initialises through torch's functions as they were when it was imported, kept in a table.
    transformers_init = getattr(sys.modules.get("transformers.initialization"), "TORCH_INIT_FUNCTIONS", {})
    transformers_originals = dict(transformers_init)
    bound = _bound_by_name(originals.values())
    try:
        for name, function in originals.items():
            setattr(torch.nn.init, name, wrapped[id(function)])
        for namespace, name, function in bound:
            namespace[name] = wrapped[id(function)]
        transformers_init.update({name: wrap(function) for name, function in transformers_originals.items()})
        yield
    finally:
        for name, function in originals.items():
            setattr(torch.nn.init, name, function)
        for namespace, name, function in bound:
            namespace[name] = function
        transformers_init.update(transformers_originals)


def _bound_by_name(functions: Iterable[InitFunction]) -> list[tuple[dict[str, Any], str, InitFunction]]:
    """Where loaded modules hold the functions under a name of their own (`from torch.nn.init import constant_`,
    as torch's `nn.MultiheadAttention` does, and the user's modules may): (namespace, name, function)."""
    by_id = {id(function): function for function in functions}
    bound = []
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if module is torch.nn.init or not isinstance(namespace, dict):
            continue
        bound.extend((namespace, name, value) for name, value in list(namespace.items())
                     if id(value) in by_id and by_id[id(value)] is value)
    return bound


def drawing_in(dtype: torch.dtype) -> Callable[[InitFunction], InitFunction]:
    """Wraps an init function so that a floating-point tensor of another dtype gets the numbers drawn into a `dtype`
    copy, rounded once: torch draws other random numbers into a bf16 tensor than into an fp32 one (in torch 2.8 every
    one), so a model built in bf16 gets the weights of the one built in `dtype`, and the random stream after them."""

    def wrap(init_function: InitFunction) -> InitFunction:
        @functools.wraps(init_function)
        def initialise(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not tensor.is_floating_point() or tensor.dtype == dtype:
                return init_function(tensor, *args, **kwargs)
            drawn = tensor.detach().to(dtype)
            init_function(drawn, *args, **kwargs)
            with torch.no_grad():
                tensor.copy_(drawn)
            return tensor

        return initialise

    return wrap
