"""One plain fp32 state dict from a checkpoint of any backend: Lightning's file, or an engine's folder read by the
backend that wrote it (its spec's `consolidate`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lightning_offload.backends import registry
from lightning_offload.saving import refuse_foreign, atomic_file, load_whole


def consolidate(checkpoint_dir: str | os.PathLike, out_path: str | os.PathLike | None = None, *,
                prefix: str = "") -> dict[str, Any]:
    """One ordinary fp32 state dict from a `single_gpu_offload` checkpoint (an engine's folder or Lightning's file).

    The result loads with `module.load_state_dict(...)` into the plain LightningModule, without DeepSpeed or any
    of this package at load time. Parameters tied in the model (an embedding shared with the output layer) are
    present under every name they had. Written atomically to `out_path` with `torch.save` when given.

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
    if checkpoint_dir.is_file():  # backends that keep whole weights on the device save Lightning's own file
        checkpoint = load_whole(checkpoint_dir, map_location="cpu", weights_only=False)
        state_dict = {name: value.float() if value.is_floating_point() else value
                      for name, value in checkpoint["state_dict"].items()}
    else:
        state_dict = _read_folder(checkpoint_dir)
    if prefix:
        state_dict = {name[len(prefix):]: value for name, value in state_dict.items() if name.startswith(prefix)}
        if not state_dict:
            raise ValueError(f"No name in {str(checkpoint_dir)!r} starts with `prefix={prefix!r}`.")
    if out_path is not None:
        with atomic_file(out_path) as staging:
            torch.save(state_dict, staging)
    return state_dict


def _read_folder(checkpoint_dir: Path) -> dict[str, Any]:
    """The fp32 state dict of an engine's checkpoint folder, read by the backend that wrote it."""
    engines = [spec for spec in registry.specs() if spec.consolidate is not None]
    for spec in engines:
        if any((checkpoint_dir / name).is_file() for name in spec.checkpoint_files):
            return spec.consolidate(checkpoint_dir)
    files = [f"`{name}`" for spec in engines for name in spec.checkpoint_files]
    raise FileNotFoundError(
        f"{str(checkpoint_dir)!r} is not a `single_gpu_offload` checkpoint folder (it has no {', '.join(files[:-1])} "
        f"or {files[-1]} file). Pass the path given to `trainer.save_checkpoint` or written by `ModelCheckpoint`."
    )
