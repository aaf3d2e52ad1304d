"""Checkpoints of the `stream` backend: one file per unit, written and read one unit at a time.

Layout of a checkpoint folder (written atomically with `saving.atomic_directory`):

    manifest.json      format, weight dtype, per unit: its file and every name of each parameter; the buffers' file
    trainer.pt         Lightning's own state (loops, LR schedulers, callbacks)
    buffers.pt         the module's persistent buffers by name, as its state dict holds them
    unit_0000.pt ...   {"weights": [tensor per parameter], "state": [uint8 records per bucket], "steps": [...]}

A unit's tensors are copied out of the arena (or off the GPU, or read from the disk tier's file) into a buffer of
that unit's size just before it is written, so saving never holds more than one unit beyond the plan's own memory;
loading maps each file (`torch.load(mmap=True)`) and copies it into place (or writes it to the disk tier's file).
The checkpoint is the same wherever the state lived while training: any placement resumes it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lightning_offload.backends.spec import SavedTensor
from lightning_offload.backends.stream.units import Unit
from lightning_offload.planner.budget import GIB
from lightning_offload.saving import atomic_directory

if TYPE_CHECKING:
    from lightning_offload.backends.stream.disk import DiskTier

FORMAT = "lightning_offload.stream"
MANIFEST = "manifest.json"
# Key of the optimizer's param groups in trainer.pt, beside Lightning's state.
PARAM_GROUPS = "stream_optimizer_param_groups"
# The file of the module's persistent buffers; the manifest names it (a folder written before buffers were saved
# names none).
BUFFERS = "buffers.pt"


def checkpoint_bytes(units: list[Unit]) -> int:
    return sum(unit.weight_bytes + unit.state_bytes for unit in units)


def check_disk(directory: Path, needed: int, what: str) -> None:
    """Refuses before writing when the disk holding `directory` has less free space than `needed` bytes."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise OSError(
            f"{what} needs {needed / GIB:.1f} GiB on the disk of {str(directory)!r}, which has {free / GIB:.1f} GiB "
            f"free ({(needed - free) / GIB:.1f} GiB short). Point `ModelCheckpoint(dirpath=...)` at a larger disk, keep "
            "fewer checkpoints (`save_top_k=1`), or train without checkpoints (`enable_checkpointing=False`)."
        )


def host_state(unit: Unit, disk: DiskTier | None) -> torch.Tensor | None:
    """The unit's 8-bit state records: its arena piece, or a copy read from its file on disk."""
    if unit.on_disk:
        assert disk is not None
        return disk.read(unit)
    return unit.host_state


def save(path: Path, units: list[Unit], dtype: torch.dtype, client_state: dict[str, Any],
         buffers: dict[str, torch.Tensor], *, disk: DiskTier | None = None, weights_only: bool = False) -> None:
    """`buffers`: the module's persistent buffers by name; `weights_only`: the units' weights without their 8-bit
    state and step counts."""
    needed = sum(unit.weight_bytes for unit in units) if weights_only else checkpoint_bytes(units)
    needed += sum(buffer.nbytes for buffer in buffers.values())
    check_disk(path.parent, needed, "This checkpoint")
    manifest = {"format": FORMAT, "dtype": str(dtype).removeprefix("torch."), "buffers": BUFFERS, "units": []}
    with atomic_directory(path, weights_only=weights_only) as staging:
        torch.save(client_state, staging / "trainer.pt")
        torch.save({name: buffer.detach().to("cpu", copy=True) for name, buffer in buffers.items()},
                   staging / BUFFERS)
        for unit in units:
            name = f"unit_{unit.index:04d}.pt"
            weights = [p.detach().to("cpu", copy=True) for p in unit.params]
            region = None if weights_only else host_state(unit, disk)
            states = [s.clone() for s in unit.state_views(region)] if region is not None else []
            steps = [] if weights_only else [list(entry.bucket.steps) for entry in unit.buckets]
            torch.save({"weights": weights, "state": states, "steps": steps}, staging / name)
            del weights, states, region
            manifest["units"].append({"file": name, "module": unit.name, "names": unit.names})
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))


def read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is not a checkpoint of the `stream` backend (no {MANIFEST}). To start from plain "
            "weights, load them with `module.load_state_dict(...)` before `fit`."
        )
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{str(manifest_path)!r} has format {manifest.get('format')!r}, not {FORMAT!r}.")
    return manifest


def saved_buffers(path: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The module's persistent buffers in the checkpoint folder `path`, memory-mapped; None for a folder written
    before they were saved."""
    if "buffers" not in manifest:
        return None
    return torch.load(path / manifest["buffers"], mmap=True, weights_only=True)


def check_buffers(path: Path, saved: dict[str, torch.Tensor] | None, buffers: dict[str, torch.Tensor],
                  strict: bool) -> None:
    """With `strict`, refuses saved buffers (`saved_buffers`) that are not the module's `buffers` by name, as
    `load_state_dict` refuses them, before anything is loaded."""
    if not strict:
        return
    if saved is None:
        if buffers:
            raise KeyError(
                f"The checkpoint {str(path)!r} was written by a version of the `stream` backend that did not save the "
                f"module's buffers, and this model has persistent buffers {sorted(buffers)[:5]}. To load its weights "
                "and keep those buffers as the model builds them, set `strict_loading = False` on the module.")
        return
    unknown, missing = sorted(set(saved) - set(buffers)), sorted(set(buffers) - set(saved))
    if unknown:
        raise KeyError(f"The checkpoint {str(path)!r} has the buffers {unknown[:5]}, which this model lacks. Load it "
                       "into the model it was saved from, or set `strict_loading = False` on the module.")
    if missing:
        raise KeyError(f"The checkpoint {str(path)!r} lacks the buffers {missing[:5]} of this model. Load the "
                       "checkpoint of this model, or set `strict_loading = False` on the module.")


def load(path: Path, units: list[Unit], buffers: dict[str, torch.Tensor], *, load_optimizer_states: bool,
         strict: bool, disk: DiskTier | None = None) -> dict[str, Any]:
    """`buffers`: the module's persistent buffers by name, which the saved ones are copied into."""
    manifest = read_manifest(path)
    saved_buffer_values = saved_buffers(path, manifest)
    check_buffers(path, saved_buffer_values, buffers, strict)
    saved = {tuple(entry["names"][0]) if entry["names"] else (): entry for entry in manifest["units"]}
    for unit in units:
        entry = saved.get(tuple(unit.names[0]) if unit.names else ())
        if entry is None or [n[0] for n in entry["names"]] != [n[0] for n in unit.names]:
            if strict:
                raise KeyError(f"The checkpoint has no unit with the parameters of {unit.name!r}.")
            continue
        content = torch.load(path / entry["file"], mmap=True, weights_only=True)
        for param, saved_weight in zip(unit.params, content["weights"]):
            param.data.copy_(saved_weight)
        if load_optimizer_states and content["steps"] and (unit.host_state is not None or unit.on_disk):
            region = torch.empty(unit.state_bytes, dtype=torch.uint8) if unit.on_disk else unit.host_state
            for view, state in zip(unit.state_views(region), content["state"]):
                view.copy_(state)
            if unit.on_disk:
                assert disk is not None
                disk.write(unit, region)
            for bucket_entry, steps in zip(unit.buckets, content["steps"]):
                bucket_entry.bucket.steps = list(steps)
        del content
    for name, value in (saved_buffer_values or {}).items():
        if name in buffers:
            buffers[name].copy_(value)
    return torch.load(path / "trainer.pt", weights_only=False)


def client_state(path: Path, *, weights_only: bool | None = False) -> dict[str, Any]:
    """Lightning's state (loops, callbacks, hyperparameters) in the checkpoint folder `path`."""
    read_manifest(path)
    state = torch.load(path / "trainer.pt", weights_only=weights_only)
    state.pop(PARAM_GROUPS, None)
    return state


def saved_weights(path: Path) -> list[SavedTensor]:
    """Each parameter's weight under every name of a tied one, then each persistent buffer, as saved; loading a
    weight maps its unit's file only while the weight lives."""
    saved = []
    manifest = read_manifest(path)
    for unit in manifest["units"]:
        file = path / unit["file"]
        weights = torch.load(file, mmap=True, weights_only=True)["weights"]
        saved += [SavedTensor(list(names), tuple(weight.shape), weight.dtype, partial(_unit_weight, file, index))
                  for index, (names, weight) in enumerate(zip(unit["names"], weights))]
        del weights  # the unit's file stays mapped only while it is read
    buffers = saved_buffers(path, manifest) or {}
    return saved + [SavedTensor([name], tuple(value.shape), value.dtype, lambda value=value: value)
                    for name, value in buffers.items()]


def _unit_weight(file: Path, index: int) -> torch.Tensor:
    return torch.load(file, mmap=True, weights_only=True)["weights"][index]


def fp32_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, fp32 weight) of every parameter, under every name of a tied one, read one unit file at a time; then
    each persistent buffer (fp32 if floating, else in its own dtype)."""
    manifest = read_manifest(path)
    for entry in manifest["units"]:
        weights = torch.load(path / entry["file"], mmap=True, weights_only=True)["weights"]
        for names, weight in zip(entry["names"], weights):
            value = weight.float()
            del weight  # the unit's file stays mapped only while its own weights are read
            for name in names:
                yield name, value
            del value
        del weights
    for name, value in (saved_buffers(path, manifest) or {}).items():
        yield name, value.float() if value.is_floating_point() else value
