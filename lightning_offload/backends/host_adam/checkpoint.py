"""The `host_adam` checkpoint: one file in a folder with the fp32 master weights and AdamW state of every
parameter (two arenas: host and device), their names and the module's buffers; read memory-mapped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lightning_offload.backends.spec import SavedTensor
from lightning_offload.saving import load_whole

CHECKPOINT_FILE = "host_adam.pt"
FORMAT = "lightning_offload.host_adam/2"
# Key of a weights-only checkpoint's master weights (one tensor per parameter, in the engine's order), which it
# holds instead of the arenas.
MASTERS = "masters"


def parameter_names(module: torch.nn.Module | None, params: list[torch.nn.Parameter]) -> list[list[str]]:
    """Every name each parameter has in the module (a tied weight has several)."""
    assert module is not None
    names: dict[torch.nn.Parameter, list[str]] = {p: [] for p in params}
    for name, param in module.named_parameters(remove_duplicate=False):
        if param in names:
            names[param].append(name)
    return [names[p] for p in params]


def persistent_buffers(module: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    assert module is not None
    parameter_names = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    return {k: v for k, v in module.state_dict(keep_vars=True).items() if k not in parameter_names}


def load_buffers(module: torch.nn.Module | None, buffers: dict[str, torch.Tensor], strict: bool) -> None:
    current = persistent_buffers(module)
    unknown, missing = sorted(set(buffers) - set(current)), sorted(set(current) - set(buffers))
    if strict and unknown:
        raise ValueError(f"The checkpoint has buffers this model lacks: {unknown}. Pass `strict_loading=False`.")
    if strict and missing:
        raise ValueError(f"The checkpoint lacks buffers of this model: {missing[:5]}. Load the checkpoint of this "
                         "model, or pass `strict_loading=False`.")
    for name, value in buffers.items():
        if name in current:
            current[name].data.copy_(value)


def read_checkpoint(path: str | Path, *, weights_only: bool | None = False) -> dict[str, Any]:
    """The state a `host_adam` checkpoint folder holds; its arena is memory-mapped, not read into memory."""
    path = Path(path)
    file = path / CHECKPOINT_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is not a checkpoint written by the `host_adam` backend (a folder with {CHECKPOINT_FILE}). "
            "To start from plain weights, load them with `module.load_state_dict(...)` before `fit`."
        )
    state = load_whole(file, map_location="cpu", mmap=True, weights_only=weights_only)
    if state.get("format") != FORMAT:
        raise ValueError(f"{str(file)!r} has format {state.get('format')!r}; this version reads {FORMAT!r}.")
    return state


def saved_parameters(state: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
    """(master, exp_avg, exp_avg_sq) of every parameter of a `host_adam` checkpoint, in the engine's order: views
    of the host arena for the first `host_params`, of the device arena for the rest (a weights-only checkpoint:
    its masters, with None for the Adam state)."""
    if MASTERS in state:
        return [(master, None, None) for master in state[MASTERS].values()]
    shapes = state["shapes"]
    host_params = state.get("host_params", len(shapes))
    parts = ((state["arena"], shapes[:host_params]), (state["device_arena"], shapes[host_params:]))
    views = []
    for arena, part in parts:
        thirds = arena.view(3, arena.numel() // 3).unbind(0)
        offset = 0
        for shape in part:
            numel = int(torch.Size(shape).numel())
            views.append(tuple(t[offset:offset + numel].view(shape) for t in thirds))
            offset += numel
    return views


def fp32_tensors(state: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a `host_adam` checkpoint, one at a time: each fp32 master weight under every name, then
    the buffers (fp32 if floating, else in their own dtype)."""
    for names, (master, _, _) in zip(state["names"], saved_parameters(state)):
        weight = master.clone()  # its own storage, not a view that keeps the whole arena
        for name in names:
            yield name, weight
        del weight
    for name, value in state["buffers"].items():
        yield name, value.float() if value.is_floating_point() else value


def load_weights(module: torch.nn.Module, state: dict[str, Any], strict: bool) -> None:
    own = dict(module.named_parameters(remove_duplicate=False))
    for name, value in fp32_tensors(state):
        if name in own:
            own[name].data.copy_(value)
    load_buffers(module, state["buffers"], strict)


def folder_fp32_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """`fp32_tensors` of the checkpoint folder `path`."""
    return fp32_tensors(read_checkpoint(path))


def client_state(path: Path, *, weights_only: bool | None = False) -> dict[str, Any]:
    """Lightning's state (loops, callbacks, hyperparameters) in the checkpoint folder `path`."""
    return read_checkpoint(path, weights_only=weights_only)["client_state"]


def saved_weights(path: Path) -> list[SavedTensor]:
    """Each fp32 master weight under every name, then the buffers, as views of the memory-mapped arenas."""
    state = read_checkpoint(path)
    saved = [SavedTensor(list(names), tuple(master.shape), master.dtype, lambda m=master: m)
             for names, (master, _, _) in zip(state["names"], saved_parameters(state))]
    return saved + [SavedTensor([name], tuple(b.shape), b.dtype, lambda b=b: b) for name, b in state["buffers"].items()]
