"""What keeps the planner's pre-flight invisible to the user's program.

The planner runs before the user's model is built: it calls the user's dataloader hook for a first batch, runs the
training step on the meta device, calls `configure_optimizers` on meta parameters and may probe the machine. A
seeded run under the strategy must draw the same random numbers, see the same data order and find its module as
under `strategy="auto"`, so all of that runs inside `user_program_preserved`, which puts back every random stream
the user can seed and the attributes every hook the planner called could have set.
"""

from __future__ import annotations

import random
from collections.abc import Generator, Iterable
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


@contextmanager
def user_program_preserved(module: nn.Module, trainer: Any, device: torch.device) -> Generator[None, None, None]:
    """Runs the pre-flight with the user's random streams (torch CPU and every CUDA device, numpy, Python's
    `random`), the module's (and its datamodule's) attributes and the fit loop's data as they were before it."""
    datamodule = getattr(trainer, "datamodule", None)
    fit_loop = getattr(trainer, "fit_loop", None)
    # `trainer.estimated_stepping_batches` in `configure_optimizers` sets up the fit loop's data: Lightning must do
    # that again, at its own time, with the random state the user's run has then.
    plain = [obj for obj in (datamodule, fit_loop) if obj is not None]
    with random_streams_kept(device), module_state_kept(module), attributes_kept(plain):
        yield


@contextmanager
def random_streams_kept(device: torch.device) -> Generator[None, None, None]:
    """Puts back the torch (CPU and every initialised CUDA device), numpy and Python random states on exit."""
    import numpy as np

    if device.type == "cuda":
        # Initialises CUDA, which applies a seed `seed_everything` queued, before the state is read.
        torch.cuda.init()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    cpu_state = torch.get_rng_state()
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


@contextmanager
def module_state_kept(module: nn.Module) -> Generator[None, None, None]:
    """Every submodule's attributes as they were on exit: plain tensors cached in a forward, what a hook set, and its
    children, parameters and buffers (submodules added meanwhile are dropped with them)."""
    with attributes_kept(list(module.modules())):
        yield


@contextmanager
def attributes_kept(objects: Iterable[Any]) -> Generator[None, None, None]:
    """`objects`' attributes as they were on exit, and the contents of those that are lists, dicts or sets (a hook
    counting its calls, a list of drawn values), put back in place so that references to them stay valid."""
    saved = [(obj, dict(obj.__dict__), {name: _contents(value) for name, value in obj.__dict__.items()
                                         if isinstance(value, (list, dict, set))})
             for obj in objects]
    try:
        yield
    finally:
        for obj, attributes, contents in saved:
            obj.__dict__.clear()
            obj.__dict__.update(attributes)
            for name, content in contents.items():
                container = attributes[name]
                if isinstance(container, list):
                    container[:] = content
                else:
                    container.clear()
                    container.update(content)


@contextmanager
def loader_untouched(loader: Any) -> Generator[None, None, None]:
    """Iterating `loader` for a peek leaves it as it was: the generators its sampler draws from are put back (the
    global streams are `random_streams_kept`'s), and a persistent-workers iterator it cached is dropped."""
    generators = [g for g in _generators_of(loader) if isinstance(g, torch.Generator)]
    states = [g.get_state() for g in generators]
    cached_iterator = getattr(loader, "_iterator", None)
    try:
        yield
    finally:
        for generator, state in zip(generators, states):
            generator.set_state(state)
        if hasattr(loader, "_iterator"):
            loader.__dict__["_iterator"] = cached_iterator


def _contents(container: list | dict | set) -> list | dict | set:
    if isinstance(container, list):
        return list(container)
    return dict(container) if isinstance(container, dict) else set(container)


def _generators_of(loader: Any) -> list[Any]:
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    inner = getattr(batch_sampler, "sampler", None)
    unique: dict[int, Any] = {}
    for owner in (loader, sampler, batch_sampler, inner):
        generator = getattr(owner, "generator", None)
        if generator is not None:
            unique[id(generator)] = generator
    return list(unique.values())
