"""Checkpoints on disk: written atomically, and consolidated into one plain state dict.

A checkpoint is first written next to its destination and moved into place only when complete, so a crash or a
full disk mid-save never leaves a half-written checkpoint under the user's name, and never destroys the previous one.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch


class Ranks(Protocol):
    """What a checkpoint written by several processes needs of them (a Lightning strategy has it)."""

    @property
    def is_global_zero(self) -> bool: ...

    def broadcast(self, obj: Any, src: int = 0) -> Any: ...

    def barrier(self, name: str | None = None) -> None: ...


@contextmanager
def atomic_directory(path: str | os.PathLike, ranks: Ranks | None = None) -> Iterator[Path]:
    """Yields an empty staging folder beside `path`; on success it replaces `path` (file or folder) in one rename.

    With `ranks`, every process gets the same staging folder (on a file system they share) to write its shards
    into; rank 0 creates it and moves it into place once every rank has finished writing.
    """
    path = Path(path)
    lead = ranks is None or ranks.is_global_zero
    staging = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    if ranks is not None:
        staging = Path(ranks.broadcast(str(staging)))
    if lead:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    if ranks is not None:
        ranks.barrier("atomic_directory:staged")
    try:
        yield staging
    except BaseException:
        if lead:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if ranks is not None:
        ranks.barrier("atomic_directory:written")
    if lead:
        _replace(staging, path)
    if ranks is not None:
        ranks.barrier("atomic_directory:replaced")


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a staging file path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        yield staging
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    _replace(staging, path)


def _replace(staging: Path, path: Path) -> None:
    if not path.exists():
        os.replace(staging, path)
        return
    # A folder cannot be renamed over a non-empty folder: move the old one aside first, and delete it only
    # once the new one is in place.
    previous = path.with_name(f".{path.name}.previous-{uuid.uuid4().hex[:8]}")
    os.replace(path, previous)
    os.replace(staging, path)
    if previous.is_dir():
        shutil.rmtree(previous)
    else:
        previous.unlink()


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
    from lightning_offload.backends import host_adam

    checkpoint_dir = Path(checkpoint_dir)
    if checkpoint_dir.is_file():  # backends that keep whole weights on the device save Lightning's own file
        checkpoint = torch.load(checkpoint_dir, map_location="cpu", weights_only=False)
        state_dict = {name: value.float() if value.is_floating_point() else value
                      for name, value in checkpoint["state_dict"].items()}
    elif (checkpoint_dir / "manifest.json").is_file():  # written by the `stream` backend
        from lightning_offload.backends.stream.checkpoint import consolidate as consolidate_stream

        state_dict = consolidate_stream(checkpoint_dir)
    elif (checkpoint_dir / host_adam.CHECKPOINT_FILE).is_file():
        state_dict = host_adam.fp32_state_dict(host_adam.read_checkpoint(checkpoint_dir))
    elif (checkpoint_dir / "latest").is_file():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state_dict = dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir)))
    else:
        raise FileNotFoundError(
            f"{str(checkpoint_dir)!r} is not a `single_gpu_offload` checkpoint folder (it has no `latest`, "
            f"`manifest.json` or `{host_adam.CHECKPOINT_FILE}` file). Pass the path given to `trainer.save_checkpoint` or written by "
            "`ModelCheckpoint`."
        )
    if prefix:
        state_dict = {name[len(prefix):]: value for name, value in state_dict.items() if name.startswith(prefix)}
        if not state_dict:
            raise ValueError(f"No name in {str(checkpoint_dir)!r} starts with `prefix={prefix!r}`.")
    if out_path is not None:
        with atomic_file(out_path) as staging:
            torch.save(state_dict, staging)
    return state_dict
