"""The safetensors format, read one tensor at a time into memory the caller owns, and written one tensor at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte range) and
the raw little-endian bytes. Reading a tensor with `readinto` straight into its destination (a parameter in host
memory, a pinned arena's view) costs no second copy and no memory-mapped pages that count as the process's own;
writing tensor by tensor keeps one tensor in memory, not one shard.
Measured beside the `safetensors` library: bench/RESULTS.md, "Reading safetensors: our reader beside the library's".
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Each read moves at most this much, so a tensor larger than 2 GiB (a big embedding) reads on every platform.
_READ_BYTES = 1 << 30


@dataclass(frozen=True)
class Entry:
    """Where one tensor's bytes are."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(file: Path) -> dict[str, Entry]:
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    data_start = 8 + length
    entries = {}
    for name, info in header.items():
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{str(file)!r}: tensor {name!r} has dtype {info['dtype']}, which torch cannot hold.")
        begin, end = info["data_offsets"]
        entries[name] = Entry(file, DTYPES[info["dtype"]], tuple(info["shape"]), data_start + begin, data_start + end)
    return entries


def read_folder(folder: Path) -> dict[str, Entry]:
    """Every tensor of a Hugging Face checkpoint folder: `model.safetensors`, or the shards its index names."""
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        entries: dict[str, Entry] = {}
        for shard in sorted(set(weight_map.values())):
            entries.update(read_header(folder / shard))
        return entries
    if (folder / SINGLE_FILE).is_file():
        return read_header(folder / SINGLE_FILE)
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise FileNotFoundError(
        f"{str(folder)!r} has no `{SINGLE_FILE}` or `{INDEX_FILE}` (it holds {found[:8]}). Pass a folder written by "
        "`save_pretrained` with safetensors (the default); a `pytorch_model.bin` checkpoint converts with "
        "`AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder)`."
    )


class Reader:
    """Reads entries into tensors; keeps one open file per shard, and one staging buffer, until closed."""

    def __init__(self) -> None:
        self._files: dict[Path, BinaryIO] = {}
        # Pageable, reused for every tensor: the disk, not the copy to the GPU, limits loading, and page-locked
        # staging would stay cached by torch's pinned allocator after loading.
        self._staging = _host_bytes(0)

    def read_into(self, entry: Entry, target: torch.Tensor) -> None:
        """Copies the entry into `target` (same shape; any dtype and device: cast and moved on the way)."""
        if tuple(target.shape) != entry.shape:
            raise ValueError(f"shape {tuple(target.shape)} in the model but {entry.shape} in {str(entry.file)!r}")
        if target.device.type == "cpu" and target.dtype == entry.dtype and target.is_contiguous():
            self._read_bytes(entry, target)
            return
        if self._staging.numel() < entry.end - entry.start:
            self._staging = _host_bytes(0)  # the old buffer goes before the larger one comes
            self._staging = _host_bytes(entry.end - entry.start)
        staging = self._staging[: entry.end - entry.start].view(entry.dtype).view(entry.shape)
        self._read_bytes(entry, staging)
        target.copy_(staging)

    def read(self, entry: Entry) -> torch.Tensor:
        tensor = torch.empty(entry.shape, dtype=entry.dtype, device="cpu")
        self._read_bytes(entry, tensor)
        return tensor

    def _read_bytes(self, entry: Entry, tensor: torch.Tensor) -> None:
        handle = self._files.get(entry.file)
        if handle is None:
            handle = self._files[entry.file] = open(entry.file, "rb", buffering=0)  # noqa: SIM115
        view = memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy())
        if len(view) != entry.end - entry.start:
            raise ValueError(f"{str(entry.file)!r} is truncated or corrupt: a tensor's byte range has "
                             f"{entry.end - entry.start} bytes for {len(view)}.")
        done = 0
        handle.seek(entry.start)
        while done < len(view):
            got = handle.readinto(view[done:done + _READ_BYTES])
            if not got:
                raise ValueError(f"{str(entry.file)!r} ends before its header says: the file is truncated.")
            done += got

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()
        self._staging = _host_bytes(0)


def _host_bytes(size: int) -> torch.Tensor:
    # In host memory whatever the default device: `pretrained` runs inside an engine's `torch.device(...)` context.
    return torch.empty(size, dtype=torch.uint8, device="cpu")


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def write_file(path: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
               tensors: Iterator[torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Writes the tensors that `tensors` yields, in `layout`'s order, each one held only while it is written."""
    with open(path, "wb") as handle:
        write_header(handle, layout, metadata)
        # Not `zip`: its reused result tuple would keep each tensor alive while the next one is made.
        for name, dtype, shape in layout:
            tensor = next(tensors)
            assert tensor.dtype == dtype and tuple(tensor.shape) == tuple(shape), name
            handle.write(tensor_bytes(tensor))
            del tensor
        handle.flush()
        os.fsync(handle.fileno())


def write_header(handle: BinaryIO, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
    """Writes the header of a file whose tensors follow in `layout`'s order, contiguous."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in layout:
        size = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header so the data starts 8-byte aligned
    handle.write(struct.pack("<Q", len(encoded)))
    handle.write(encoded)
