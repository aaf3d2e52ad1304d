"""One plain fp32 state dict from a checkpoint of any backend: Lightning's file, or an engine's folder read by the
backend that wrote it (its spec's `fp32_tensors`), written one tensor at a time."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lightning_offload.backends import registry
from lightning_offload.saving import atomic_file, load_whole, refuse_foreign, write_state_dict


def consolidate(checkpoint_dir: str | os.PathLike, out_path: str | os.PathLike | None = None, *,
                prefix: str = "") -> dict[str, Any]:
    """One ordinary fp32 state dict from a `single_gpu_offload` checkpoint (an engine's folder or Lightning's file).

    The result loads with `module.load_state_dict(...)` into the plain LightningModule, without DeepSpeed or any
    of this package at load time. Parameters tied in the model (an embedding shared with the output layer) are
    present under every name they had. With `out_path`, the state dict is written there atomically, one tensor at a
    time (`torch.load` reads it), and returned memory-mapped from that file: memory holds one tensor and the pages of
    the checkpoint file being read, not the fp32 model. Without it, the state dict is built in memory.

    `prefix` keeps only the names under it, without it: `prefix="model."` gives the state dict of `self.model`, which
    loads into that model outside Lightning. A model of `transformers` goes out whole with
    `lightning_offload.export.export_hf`, tensor by tensor, as a folder `from_pretrained` loads.
    """
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
    with atomic_file(out_path) as staging:
        write_state_dict(staging, tensors)
    return torch.load(out_path, map_location="cpu", mmap=True, weights_only=True)


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
