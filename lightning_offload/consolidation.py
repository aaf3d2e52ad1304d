"""One plain fp32 state dict from a checkpoint of any backend: Lightning's file, or an engine's folder read by the
backend that wrote it (its spec's `fp32_tensors`), written one tensor at a time.

`import lightning_offload` also lets `LightningModule.load_from_checkpoint(path)` read an engine's folder
(`read_checkpoint_folders`): Lightning's loader opens every path as one file.
"""

from __future__ import annotations

import functools
import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from lightning_offload.backends import registry
from lightning_offload.saving import atomic_file, is_checkpoint_folder, load_whole, refuse_foreign, write_state_dict

# The key of a folder's Lightning state that records where its run kept the weights, as the location tag
# `torch.save` gives a storage there ("cuda:0"): its weights load there, as a file's storages do. A folder without it
# (saved before it was recorded) counts as saved from host memory ("cpu").
WEIGHTS_LOCATION_KEY = "lightning_offload_weights_location"


def consolidate(checkpoint_dir: str | os.PathLike, out_path: str | os.PathLike | None = None, *,
                prefix: str = "", lightning_file: bool = False) -> dict[str, Any]:
    """One ordinary fp32 state dict from a `single_gpu_offload` checkpoint (an engine's folder or Lightning's file).

    The result loads with `module.load_state_dict(...)` into the plain LightningModule, without DeepSpeed or any
    of this package at load time. Parameters tied in the model (an embedding shared with the output layer) are
    present under every name they had. With `out_path`, the state dict is written there atomically, one tensor at a
    time (`torch.load` reads it), and returned memory-mapped from that file: memory holds one tensor and the pages of
    the checkpoint file being read, not the fp32 model. Without it, the state dict is built in memory.

    `prefix` keeps only the names under it, without it: `prefix="model."` gives the state dict of `self.model`, which
    loads into that model outside Lightning. A model of `transformers` goes out whole with
    `lightning_offload.export.export_hf`, tensor by tensor, as a folder `from_pretrained` loads.

    `lightning_file=True` writes Lightning's own checkpoint file instead (the state dict under `"state_dict"`, beside
    the hyperparameters and loops the checkpoint holds), which `MyModule.load_from_checkpoint(out_path)` reads
    without this package; it returns that checkpoint, the state dict memory-mapped. Its weights are tagged where the
    run kept them, as in Lightning's file of that run: `load_from_checkpoint` puts them back on that GPU (on the CPU
    where CUDA is not available); `torch.load` of it without that GPU needs `map_location="cpu"`, as of that file.
    """
    if lightning_file and (out_path is None or prefix):
        raise ValueError("`lightning_file=True` writes Lightning's checkpoint of the whole module: pass `out_path` "
                         "(e.g. 'model.ckpt') and no `prefix`.")
    checkpoint_dir = Path(checkpoint_dir)
    if out_path is not None:  # refused before the (long) read
        if Path(out_path).resolve() == checkpoint_dir.resolve():
            raise FileExistsError(
                f"`consolidate` would write over the checkpoint it reads ({str(checkpoint_dir)!r}). Pass another "
                "`out_path`, e.g. 'model.pt'."
            )
        refuse_foreign(Path(out_path), "file")
    tensors = _under_prefix(fp32_tensors(checkpoint_dir), prefix, checkpoint_dir)
    if out_path is None:
        return dict(tensors)
    lightning_state = _saved_state(checkpoint_dir, weights_only=False) if lightning_file else None
    with atomic_file(out_path) as staging:
        if lightning_state is None:
            write_state_dict(staging, tensors)
        else:  # tagged where the run kept its weights, as Lightning's file of that run is
            saved_at = lightning_state.pop(WEIGHTS_LOCATION_KEY)
            write_state_dict(staging, tensors, around=lambda state_dict: {**lightning_state, "state_dict": state_dict},
                             location=saved_at)
    return torch.load(out_path, map_location="cpu", mmap=True, weights_only=lightning_state is None)


def _saved_state(checkpoint: Path, weights_only: bool | None) -> dict[str, Any]:
    """Lightning's state in any backend's checkpoint (hyperparameters, loops, callbacks) without the weights and the
    optimizer state, and where the run kept its weights under `WEIGHTS_LOCATION_KEY` (a folder's record, "cpu" where
    it has none; a file's tag of its weights); `weights_only` as `torch.load`'s."""
    if checkpoint.is_file():
        state = _file_state(checkpoint, weights_only)
    else:
        state = registry.checkpoint_spec(checkpoint).client_state(checkpoint, weights_only=weights_only)
        state.setdefault(WEIGHTS_LOCATION_KEY, "cpu")
    return {key: value for key, value in state.items() if key not in ("state_dict", "optimizer_states")}


def _file_state(path: Path, weights_only: bool | None) -> dict[str, Any]:
    """Lightning's file `path` read into host memory, with the location tag of its state dict's first tensor under
    `WEIGHTS_LOCATION_KEY` (Lightning's `load_from_checkpoint` moves the module to that tensor's device)."""
    tags: dict[int, str] = {}

    def in_host_memory(storage: torch.UntypedStorage, location: str) -> torch.UntypedStorage:
        tags[storage._cdata] = location
        return storage

    state = load_whole(path, map_location=in_host_memory, mmap=True, weights_only=weights_only)
    first = next((t for t in state.get("state_dict", {}).values() if isinstance(t, torch.Tensor)), None)
    state[WEIGHTS_LOCATION_KEY] = "cpu" if first is None else tags.get(first.untyped_storage()._cdata, "cpu")
    return state


def weights_location(device: torch.device) -> str:
    """The location tag `torch.save` gives a storage on `device` ("cpu", "cuda:0"), which a folder records."""
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        return f"cuda:{torch.cuda.current_device() if device.index is None else device.index}"
    return str(device)


def lightning_checkpoint(checkpoint: str | os.PathLike, *, map_location: Any = None,
                         weights_only: bool | None = False) -> dict[str, Any]:
    """Lightning's checkpoint (its dict, as `torch.load` of its file gives it) of an engine's folder: Lightning's
    state with the fp32 weights under `"state_dict"`, in memory. `map_location` and `weights_only` act as they do
    in `torch.load` of Lightning's file, the weights counting as saved where the folder's run kept them (its
    recorded location, e.g. `"cuda:0"`; `"cpu"` for a folder that records none)."""
    checkpoint = Path(checkpoint)
    state = _saved_state(checkpoint, weights_only)
    saved_at = state.pop(WEIGHTS_LOCATION_KEY)
    return {**state, "state_dict": _placed(fp32_tensors(checkpoint), map_location, saved_at)}


def _placed(tensors: Iterator[tuple[str, torch.Tensor]], map_location: Any, saved_at: str) -> dict[str, torch.Tensor]:
    """The tensors as `torch.load(..., map_location=map_location)` places a file's whose storages are tagged
    `saved_at`: each storage (a tied weight's once) goes through the same mapping (a dict, a callable, a device or
    its name; None: onto `saved_at` itself)."""
    from torch.serialization import _get_restore_location

    restore = _get_restore_location(map_location)
    # By the storage the reader gave, so the names of a tied weight stay one tensor where they land; held weakly,
    # as a freed storage's address may come back for the next tensor read.
    restored: dict[int, tuple[weakref.ref, torch.UntypedStorage]] = {}
    placed = {}
    for name, tensor in tensors:
        storage = tensor.untyped_storage()
        source, target = restored.get(storage._cdata, (None, None))
        if source is None or source() is not storage:
            target = restore(storage, saved_at)
            restored[storage._cdata] = (weakref.ref(storage), target)
        placed[name] = torch.empty(0, dtype=tensor.dtype, device=target.device).set_(
            target, tensor.storage_offset(), tensor.size(), tensor.stride())
    return placed


def read_checkpoint_folders(saving: ModuleType) -> None:
    """Lets `load_from_checkpoint` of Lightning's namespace whose `core.saving` module is `saving` read an engine's
    checkpoint folder as the Lightning checkpoint it holds (`lightning_checkpoint`, with the caller's `map_location`
    and `weights_only`); every other path is read by Lightning's own loader, unchanged."""
    load = getattr(saving, "pl_load", None)
    # A Lightning without this loader keeps its own behaviour: folders are then read through `consolidate`.
    if load is None or getattr(load, "reads_checkpoint_folders", False):
        return

    @functools.wraps(load)
    def load_file_or_folder(path_or_url: Any, map_location: Any = None, weights_only: bool | None = None) -> Any:
        if not (isinstance(path_or_url, (str, os.PathLike)) and is_checkpoint_folder(Path(path_or_url))):
            return load(path_or_url, map_location=map_location, weights_only=weights_only)
        return lightning_checkpoint(path_or_url, map_location=map_location, weights_only=weights_only)

    load_file_or_folder.reads_checkpoint_folders = True
    saving.pl_load = load_file_or_folder


def checkpoint_writer(checkpoint: str | os.PathLike) -> str | None:
    """The backend whose checkpoint folder `checkpoint` is; None for Lightning's file (or a path with nothing)."""
    checkpoint = Path(checkpoint)
    return registry.checkpoint_spec(checkpoint).name if checkpoint.is_dir() else None


def file_backends() -> list[str]:
    """The backends that save Lightning's own file (and resume from one)."""
    return [spec.name for spec in registry.specs() if spec.fp32_tensors is None]


def fp32_tensors(checkpoint_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, fp32 weight or buffer) of any backend's checkpoint, one at a time."""
    if checkpoint_dir.is_file():  # backends that keep whole weights on the device save Lightning's own file
        return _lightning_file_tensors(checkpoint_dir)
    return registry.checkpoint_spec(checkpoint_dir).fp32_tensors(checkpoint_dir)


def _lightning_file_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    state_dict = load_whole(path, map_location="cpu", mmap=True, weights_only=False)["state_dict"]
    for name, value in state_dict.items():
        yield name, value.float() if value.is_floating_point() else value


def _under_prefix(tensors: Iterator[tuple[str, torch.Tensor]], prefix: str,
                  checkpoint_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if not prefix:
        yield from tensors
        return
    kept = 0
    for name, tensor in tensors:
        if name.startswith(prefix):
            kept += 1
            yield name[len(prefix):], tensor
        del tensor
    if not kept:
        raise ValueError(f"No name in {str(checkpoint_dir)!r} starts with `prefix={prefix!r}`.")
