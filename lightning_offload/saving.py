"""Checkpoints on disk, written atomically (`consolidation.py` reads them back as one plain state dict).

A checkpoint is first written next to its destination (same folder, so the same file system), flushed to disk, and
renamed into place only when complete: a crash, Ctrl+C or a full disk mid-save never leaves a half-written checkpoint
under the user's name and never destroys the previous one. Nothing a save did not write is ever replaced, and what a
killed save left beside its destination is removed by the next save or fit (`remove_stale_leftovers`).
`write_state_dict` writes a state dict that `torch.load` reads while holding one of its tensors at a time.
"""

from __future__ import annotations

import ctypes
import errno
import io
import os
import pickle
import re
import shutil
import signal
import socket
import sys
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.serialization import get_crc32_options, skip_data

# Written into every checkpoint folder: a later save may replace a folder only if it carries this (or one of the
# engines' own files, for folders written before it existed).
FOLDER_MARKER = ".lightning_offload-checkpoint"
# Written beside it in a folder saved with `weights_only=True`: its weights, without the optimizer state to resume.
WEIGHTS_ONLY_MARKER = ".lightning_offload-weights-only"
_ENGINE_FILES = ("latest", "manifest.json", "host_adam.pt")
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|previous|removed)-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}$")
_RENAME_EXCHANGE = 2


class Ranks(Protocol):
    """What a checkpoint written by several processes needs of them (a Lightning strategy has it)."""

    @property
    def is_global_zero(self) -> bool: ...

    def broadcast(self, obj: Any, src: int = 0) -> Any: ...

    def barrier(self, name: str | None = None) -> None: ...


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous one under the same name is unchanged."""


class WeightsOnlyCheckpointError(KeyError):
    """`fit(ckpt_path=...)` was given a checkpoint without optimizer state (a `KeyError`, as Lightning raises)."""

    __str__ = Exception.__str__


def weights_only_refusal(path: str | os.PathLike) -> str:
    return (
        f"The checkpoint {str(path)!r} holds the model's weights only (saved with `weights_only=True` or "
        "`ModelCheckpoint(save_weights_only=True)`): it has no optimizer state for `trainer.fit(ckpt_path=...)` to "
        "resume. To start a new run from these weights with a fresh optimizer, load them and fit without "
        f"`ckpt_path`: `model = MyModule.load_from_checkpoint({str(path)!r})`, then `trainer.fit(model)`. To resume "
        "training, save full checkpoints (`save_weights_only=False`)."
    )


def _sibling(path: Path, kind: str) -> Path:
    # Host and process id in the name: a later run removes only what a process that no longer runs left behind.
    return path.with_name(f".{path.name}.{kind}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def stale_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Staging and set-aside copies in `folder` that a save killed mid-way (SIGKILL, power loss) left behind."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    host, found = socket.gethostname(), []
    for entry in folder.iterdir():
        match = _LEFTOVER.match(entry.name)
        if match is None or match["host"] != host:
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and _process_running(pid):
            continue
        found.append(entry)
    return found


def remove_stale_leftovers(folder: str | os.PathLike) -> int:
    """Removes `stale_leftovers(folder)`; a set-aside previous checkpoint whose replacement never arrived is put
    back under its name instead. Returns the bytes freed."""
    freed = 0
    for entry in stale_leftovers(folder):
        match = _LEFTOVER.match(entry.name)
        assert match is not None
        target = entry.with_name(match["name"])
        if match["kind"] == "previous" and not target.exists() and not target.is_symlink():
            os.replace(entry, target)
            continue
        freed += _size(entry)
        _remove(entry)
    return freed


def _process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _size(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def holds_weights_only(path: str | os.PathLike) -> bool:
    """Whether the checkpoint folder `path` was saved with `weights_only=True` (it cannot resume a fit)."""
    return (Path(path) / WEIGHTS_ONLY_MARKER).is_file()


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Removes a checkpoint: a folder is renamed aside in one step, then deleted, so its name never holds a part of
    it (a process killed mid-way leaves only the renamed copy, which the next save or fit removes)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        removed = _sibling(path, "removed")
        os.replace(path, removed)
        _fsync(path.parent)
        _remove(removed)
    else:
        path.unlink(missing_ok=True)


def is_checkpoint_folder(path: Path) -> bool:
    """Whether `path` is a folder a save of this package wrote (which a later save may replace)."""
    return path.is_dir() and any((path / name).is_file() for name in (FOLDER_MARKER, *_ENGINE_FILES))


def refuse_foreign(path: Path, what: str) -> None:
    if path.is_symlink() or not path.exists():
        return
    if what == "folder" and path.is_dir() and (not any(path.iterdir()) or is_checkpoint_folder(path)):
        return
    if what == "file" and path.is_file():
        return
    kind = "folder" if path.is_dir() else "file"
    raise FileExistsError(
        f"{str(path)!r} is an existing {kind} that is not a checkpoint {what} written by `lightning_offload`; saving "
        f"there would replace it and everything in it. Choose a new path (e.g. {str(path / 'last.ckpt')!r}) "
        "or move the existing one away."
    )


def _disk_full(error: BaseException, folder: Path) -> bool:
    # torch.save's C++ writer reports a full disk as a bare stream error, so the disk itself is asked too.
    if isinstance(error, (OSError, RuntimeError)) and folder.is_dir() and shutil.disk_usage(folder).free < 2**20:
        return True
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(seen) or "file write failed" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _write_error(path: Path, staging: Path, error: BaseException) -> CheckpointWriteError:
    written = _size(staging) if staging.exists() else 0
    free = shutil.disk_usage(path.parent).free
    return CheckpointWriteError(
        errno.ENOSPC,
        f"The disk of {str(path.parent)!r} is full: the checkpoint {str(path)!r} stopped after "
        f"{written / 2**20:.1f} MiB ({free / 2**20:.1f} MiB free). Nothing was replaced: the previous checkpoint "
        "under that name, if any, is unchanged. Free space, point the checkpoint folder (`ModelCheckpoint(dirpath=)`) "
        "at a larger disk, or keep fewer checkpoints (`save_top_k=1`).",
    )


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for child in path.rglob("*"):
            if child.is_file() or child.is_dir():
                _fsync(child)
    _fsync(path)


@contextmanager
def atomic_directory(path: str | os.PathLike, ranks: Ranks | None = None, *,
                     weights_only: bool = False) -> Iterator[Path]:
    """Yields an empty staging folder beside `path`; on success it replaces `path` in one rename.

    `weights_only`: the folder is marked as holding weights without optimizer state (`holds_weights_only`).

    `path` must be new, an empty folder, or a checkpoint folder an earlier save wrote: anything else is refused
    before anything is written. With `ranks`, every process gets the same staging folder (on a file system they
    share) to write its shards into; rank 0 creates it and moves it into place once every rank has finished writing.
    """
    path = Path(path)
    lead = ranks is None or ranks.is_global_zero
    staging = _sibling(path, "partial")
    if ranks is not None:
        staging = Path(ranks.broadcast(str(staging)))
    if lead:
        refuse_foreign(path, "folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_leftovers(path.parent)
    try:
        if lead:
            staging.mkdir()
            (staging / FOLDER_MARKER).touch()
            if weights_only:
                (staging / WEIGHTS_ONLY_MARKER).touch()
        if ranks is not None:
            ranks.barrier("atomic_directory:staged")
        yield staging
        if ranks is not None:
            ranks.barrier("atomic_directory:written")
        if lead:
            _fsync_tree(staging)
            with _interrupts_deferred():
                _replace(staging, path)
    except BaseException as error:
        failure = _write_error(path, staging, error) if lead and _disk_full(error, path.parent) else None
        if lead:
            _remove(staging)
        if failure is not None:
            raise failure from error
        raise
    if ranks is not None:
        ranks.barrier("atomic_directory:replaced")


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a staging file path beside `path`; once the caller has written it, it is flushed to disk and replaces
    `path` in one rename. An existing folder at `path` is refused, never replaced."""
    path = Path(path)
    refuse_foreign(path, "file")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_leftovers(path.parent)
    staging = _sibling(path, "partial")
    try:
        yield staging
        if not staging.is_file():
            raise FileNotFoundError(f"Nothing was written to {str(staging)!r} for the checkpoint {str(path)!r}.")
        _fsync(staging)
        with _interrupts_deferred():
            os.replace(staging, path)
            _fsync(path.parent)
    except BaseException as error:
        failure = _write_error(path, staging, error) if _disk_full(error, path.parent) else None
        _remove(staging)
        if failure is not None:
            raise failure from error
        raise


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Ctrl+C (or SIGTERM) during the renames that put a checkpoint in place takes effect right after them."""
    deferred = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, deferred)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _replace(staging: Path, path: Path) -> None:
    if not path.exists() and not path.is_symlink():
        os.replace(staging, path)
    elif not _exchange(staging, path):
        # No atomic exchange on this file system: move the old folder aside (a later start puts it back if the
        # process dies before the new one is in place), then move the new one in.
        previous = _sibling(path, "previous")
        os.replace(path, previous)
        os.replace(staging, path)
        _remove(previous)
    else:
        _remove(staging)  # the previous checkpoint, swapped out
    _fsync(path.parent)


def _exchange(first: Path, second: Path) -> bool:
    """Swaps two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), _RENAME_EXCHANGE)
    return result == 0


def save_with_checkpoint_io(checkpoint_io: Any, checkpoint: dict[str, Any], path: str | os.PathLike,
                            storage_options: Any = None) -> None:
    """Lightning's single-file checkpoint, written by the Trainer's `CheckpointIO` into a staging file beside `path`
    and renamed into place (Lightning's own writer stages in the system temp folder, which is not atomic when that
    is another file system). Remote paths (`s3://...`) and asynchronous writers are left to the `CheckpointIO`."""
    text = str(path)
    if ("://" in text and not text.startswith("file://")) or type(checkpoint_io).__name__ == "AsyncCheckpointIO":
        checkpoint_io.save_checkpoint(checkpoint, path, storage_options=storage_options)
        return
    path = Path(text.removeprefix("file://"))
    default_writer = (type(checkpoint_io).__name__ == "TorchCheckpointIO"
                      and type(checkpoint_io).__module__.endswith("plugins.io.torch_io"))
    if default_writer and storage_options is not None:
        # Lightning's own message for the default writer.
        checkpoint_io.save_checkpoint(checkpoint, path, storage_options=storage_options)
    with atomic_file(path) as staging:
        if default_writer:
            with open(staging, "wb") as file:
                torch.save(checkpoint, file)
        else:
            checkpoint_io.save_checkpoint(checkpoint, staging, storage_options=storage_options)


def load_whole(path: str | os.PathLike, **load_options: Any) -> Any:
    """`torch.load(path)`, with a truncated or corrupt file reported by its name instead of the zip reader's."""
    with damage_reported(path):
        return torch.load(path, **load_options)


@contextmanager
def damage_reported(path: str | os.PathLike) -> Iterator[None]:
    """Reads of the checkpoint file `path` inside fail on a truncated or corrupt file with one message naming it."""
    try:
        yield
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
        if "weights_only" in str(error) or not _looks_damaged(error):
            raise
        raise ValueError(
            f"The checkpoint file {str(path)!r} is truncated or corrupt ({os.path.getsize(path)} bytes: "
            f"{_first_sentence(error)}). "
            "It was not written by a complete save: resume from an earlier checkpoint."
        ) from error


def _first_sentence(error: BaseException) -> str:
    return str(error).strip().splitlines()[0].split(". ")[0] if str(error).strip() else type(error).__name__


def _looks_damaged(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, (EOFError, pickle.UnpicklingError)) or any(
        sign in text for sign in ("zip archive", "central directory", "PytorchStreamReader", "file not found"))


def checkpoints_on_disk_at_once(save_top_k: int, save_last: Any) -> int:
    """Checkpoints a `ModelCheckpoint` with these settings holds on disk at its peak: those it keeps (`save_top_k`;
    -1, keep all, counted as two), `last` beside them, and one more while a save is written beside the checkpoint it
    replaces (atomic). 0 when it saves nothing."""
    kept = save_top_k if save_top_k > 0 else (2 if save_top_k < 0 else 0)
    return kept + bool(save_last) + 1 if kept or save_last else 0


def write_state_dict(path: str | os.PathLike, tensors: Iterable[tuple[str, torch.Tensor]], *,
                     around: Callable[[dict[str, torch.Tensor]], Any] | None = None, location: str = "cpu") -> int:
    """Writes the (name, tensor) pairs `tensors` yields as the state dict `torch.save(dict(tensors), path)` would,
    holding one tensor at a time: each tensor's bytes go to the file as it comes, the names and shapes last.

    A name whose tensor views the same memory as an earlier one's (a tied weight) is stored once and shared on
    load, as `torch.save` does. `around` builds the object written in its place from the state dict
    (`lambda state_dict: {**lightning_state, "state_dict": state_dict}`); host tensors it adds are written whole.
    `location` tags the state dict's storages as `torch.save` tags those of tensors there ("cuda:0": `torch.load`
    puts them back on that GPU); the tensors themselves are read wherever they are. Returns the number of names
    written.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.serialization import config

    # torch.save's own zip writer, with its alignment: `torch.load(mmap=True)` maps each tensor aligned.
    alignment = config.save.storage_alignment
    writer = torch._C.PyTorchFileWriter(str(path), get_crc32_options(), alignment)
    # Shape-only stand-ins of the written tensors, pickled at the end exactly as torch.save pickles tensors.
    stand_ins: dict[str, torch.Tensor] = {}
    keys: dict[int, str] = {}
    # What was written, by the memory it came from: a name that views the same bytes (a tied weight) shares it.
    written: dict[tuple[Any, ...], tuple[weakref.ref, torch.Tensor]] = {}
    shapes_only = FakeTensorMode()
    for name, tensor in tensors:
        storage = tensor.untyped_storage()
        view = (id(storage), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        seen = written.get(view)
        if seen is not None and seen[0]() is storage:  # alive, so its memory was not reused
            stand_ins[name] = seen[1]
            continue
        whole = tensor.detach().contiguous()
        nbytes = whole.numel() * whole.element_size()
        if whole.storage_offset() or whole.untyped_storage().nbytes() != nbytes:  # a view: its own bytes only
            whole = whole.clone()
        key = str(len(keys))
        writer.write_record(f"data/{key}", whole.untyped_storage(), nbytes)
        with shapes_only:
            stand_in = torch.empty(whole.shape, dtype=whole.dtype)
        keys[stand_in.untyped_storage()._cdata] = key
        written[view] = (weakref.ref(storage), stand_in)
        stand_ins[name] = stand_in
        del tensor, storage, whole
    with skip_data(materialize_fake_tensors=True):
        pickled = io.BytesIO()
        _StandInPickler(pickled, keys, writer, location).dump(stand_ins if around is None else around(stand_ins))
    for record, value in (("data.pkl", pickled.getvalue()), (".format_version", "1"),
                          (".storage_alignment", str(alignment)), ("byteorder", sys.byteorder)):
        writer.write_record(record, value, len(value))
    writer.write_end_of_file()
    return len(stand_ins)


class _StandInPickler(pickle.Pickler):
    """torch.save's pickling of tensors, with each storage named by the record its bytes were written to and tagged
    `location` (a tensor beside the state dict: "cpu", where it is)."""

    def __init__(self, file: io.BytesIO, keys: dict[int, str], writer: Any, location: str) -> None:
        super().__init__(file, protocol=2)
        self.keys = keys
        self.writer = writer
        self.location = location
        self.beside: set[int] = set()

    def persistent_id(self, obj: Any) -> tuple[Any, ...] | None:
        if isinstance(obj, torch.storage.TypedStorage):
            storage, storage_type, size = obj._untyped_storage, getattr(torch, obj._pickle_storage_type()), obj._size()
        elif isinstance(obj, torch.UntypedStorage):
            storage, storage_type, size = obj, torch.UntypedStorage, obj.nbytes()
        else:
            return None
        key = self._key(storage)  # first: it notes a storage written beside the state dict
        return ("storage", storage_type, key, "cpu" if storage._cdata in self.beside else self.location, size)

    def _key(self, storage: torch.UntypedStorage) -> str:
        if storage._cdata not in self.keys:  # a tensor beside the state dict: written now, whole
            if storage.device.type != "cpu":
                raise ValueError("Tensors written beside a streamed state dict must be in host memory.")
            self.keys[storage._cdata] = key = f"extra{len(self.keys)}"
            self.beside.add(storage._cdata)
            self.writer.write_record(f"data/{key}", storage, storage.nbytes())
        return self.keys[storage._cdata]
