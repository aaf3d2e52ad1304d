"""Saves that are killed, interrupted or run out of disk never corrupt or lose a checkpoint, and never replace
anything they did not write."""

from __future__ import annotations

import itertools
import os
import random
import signal
import tempfile
import time
from pathlib import Path

import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lightning_offload import saving
from lightning_offload.consolidation import consolidate
from lightning_offload.saving import (
    CheckpointWriteError,
    atomic_directory,
    remove_stale_leftovers,
    save_with_checkpoint_io,
    stale_leftovers,
)

KILLS_PER_FAMILY = 20
# Large enough that a save takes tens of milliseconds, so random kills land inside it.
STATE_NUMEL = 4 * 2**20


def _state(step: int) -> dict:
    return {"step": step, "weights": torch.full((STATE_NUMEL,), float(step))}


def _save_file(path: Path, state: dict) -> None:
    save_with_checkpoint_io(TorchCheckpointIO(), state, path)


def _save_folder(path: Path, state: dict) -> None:
    with atomic_directory(path) as staging:
        torch.save(state, staging / "state.pt")


def _load_file(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _load_folder(path: Path) -> dict:
    return torch.load(path / "state.pt", weights_only=True)


FAMILIES = {
    # Lightning's single-file checkpoint (`device`, `gpu_8bit`, `fsdp`) and an engine's folder (`host_adam`,
    # `deepspeed`, `stream`), the latter also where the file system cannot swap two folders in one step.
    "file": (_save_file, _load_file, True),
    "folder": (_save_folder, _load_folder, True),
    "folder_without_exchange": (_save_folder, _load_folder, False),
}


def _saving_child(save, target: Path, states: list[dict], temp_dir: Path, exchange: bool, ready_fd: int) -> None:
    """Runs in a forked process: saves `target` again and again until it is killed. The states are built before
    the fork: tensor operations in a forked child can hang in the parent's thread pool."""
    code = 1
    try:
        tempfile.tempdir = str(temp_dir)
        if not exchange:
            saving._exchange = lambda first, second: False
        os.write(ready_fd, b"r")
        for step in itertools.count():
            save(target, states[step % len(states)])
    except KeyboardInterrupt:
        code = 0
    finally:
        os._exit(code)


def _wait_for_exit(pid: int, sig: int) -> None:
    """Waits for the killed child. A SIGINT that lands while Python runs a destructor is reported as "ignored" and
    the child saves on, so it is sent again each second, as a user presses Ctrl-C again."""
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        time.sleep(1.0)
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            return
        os.kill(pid, sig)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kills_during_saves_leave_the_last_complete_checkpoint(other_filesystem, tmp_path, family: str) -> None:
    save, load, exchange = FAMILIES[family]
    target = other_filesystem / "checkpoints" / "last.ckpt"
    temp_dir = tmp_path / "system_temp"
    temp_dir.mkdir()
    states = [_state(step) for step in (1, 2)]
    save(target, _state(0))
    rng = random.Random(0)
    leftovers_seen, last_step = 0, 0
    for kill in range(2 * KILLS_PER_FAMILY):
        sig = signal.SIGKILL if kill % 2 else signal.SIGINT
        ready_read, ready_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(ready_read)
            _saving_child(save, target, states, temp_dir, exchange, ready_write)
        os.close(ready_write)
        os.read(ready_read, 1)
        os.close(ready_read)
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(pid, sig)
        _wait_for_exit(pid, sig)
        leftovers = stale_leftovers(target.parent)
        if not exchange and not target.exists():
            # A SIGKILL between the two renames of a file system without an atomic exchange leaves the previous
            # checkpoint set aside; the next save or fit puts it back under its name.
            assert sig == signal.SIGKILL
            remove_stale_leftovers(target.parent)
        state = load(target)  # whole and readable after every kill
        assert torch.equal(state["weights"], torch.full((STATE_NUMEL,), float(state["step"])))
        last_step = max(last_step, state["step"])
        if sig == signal.SIGINT:
            assert leftovers == [], "an interrupted save cleans up after itself"
        leftovers_seen += bool(leftovers)
        remove_stale_leftovers(target.parent)
        assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
    assert leftovers_seen > 0, "no kill landed inside a save: the test did not test anything"
    assert last_step > 0
    assert list(temp_dir.iterdir()) == [], "saves leave nothing in the system temp folder"


def test_a_previous_checkpoint_set_aside_by_a_killed_save_is_put_back(tmp_path) -> None:
    target = tmp_path / "last.ckpt"
    _save_folder(target, _state(1))
    dead_pid = _exited_process_id()
    aside = target.with_name(f".last.ckpt.previous-{saving.socket.gethostname()}-{dead_pid}-0123abcd")
    staging = target.with_name(f".last.ckpt.partial-{saving.socket.gethostname()}-{dead_pid}-4567cdef")
    os.replace(target, aside)  # where the process died: old checkpoint aside, new one not yet in place
    staging.mkdir()
    remove_stale_leftovers(tmp_path)
    assert _load_folder(target)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_leftovers_of_a_running_process_are_not_touched(tmp_path) -> None:
    parent_pid = os.getppid()  # running, and not this process
    staging = tmp_path / f".last.ckpt.partial-{saving.socket.gethostname()}-{parent_pid}-0123abcd"
    staging.mkdir()
    assert stale_leftovers(tmp_path) == []
    remove_stale_leftovers(tmp_path)
    assert staging.is_dir()


def _exited_process_id() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


@pytest.mark.parametrize("family", ["file", "folder"])
def test_a_full_disk_fails_the_save_and_keeps_the_previous_checkpoint(small_tmpfs, family: str) -> None:
    save, load, _ = FAMILIES[family]
    target = small_tmpfs / "epoch=1.ckpt"
    small = {"step": 1, "weights": torch.full((2**19,), 1.0)}  # 2 MiB
    too_large = {"step": 2, "weights": torch.full((2**21,), 2.0)}  # 8 MiB, more than the disk
    if family == "file":
        save_with_checkpoint_io(TorchCheckpointIO(), small, target)
    else:
        with atomic_directory(target) as staging:
            torch.save(small, staging / "state.pt")
    with pytest.raises(CheckpointWriteError, match=r"is full.*previous checkpoint under that name, if any, is unchanged"):
        if family == "file":
            save_with_checkpoint_io(TorchCheckpointIO(), too_large, target)
        else:
            with atomic_directory(target) as staging:
                torch.save(too_large, staging / "state.pt")
    assert load(target)["step"] == 1
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["epoch=1.ckpt"]


def test_a_folder_save_never_replaces_a_folder_it_did_not_write(tmp_path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a checkpoint folder written by `lightning_offload`"):
        _save_folder(project, _state(1))
    assert (project / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]


def test_a_file_save_never_replaces_a_folder(tmp_path) -> None:
    folder = tmp_path / "model.pt"
    folder.mkdir()
    (folder / "keep").write_text("mine")
    with pytest.raises(FileExistsError, match="is an existing folder"):
        _save_file(folder, _state(1))
    assert (folder / "keep").read_text() == "mine"


def test_consolidate_refuses_to_write_over_a_folder_or_its_own_input(tmp_path) -> None:
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, checkpoint)
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is an existing folder"):
        consolidate(checkpoint, project)
    with pytest.raises(FileExistsError, match="would write over the checkpoint it reads"):
        consolidate(checkpoint, checkpoint)
    assert (project / "notes.txt").read_text() == "mine"
    assert torch.equal(torch.load(checkpoint)["state_dict"]["w"], torch.ones(2))
    consolidate(checkpoint, tmp_path / "model.pt")
    assert torch.equal(torch.load(tmp_path / "model.pt")["w"], torch.ones(2))


def test_trainer_save_checkpoint_of_an_engine_never_replaces_a_users_folder(tmp_path) -> None:
    from lightning_offload import SingleGPUOffloadStrategy
    from tests.conftest import fit

    _, trainer = fit(SingleGPUOffloadStrategy(backend="host_adam", check_memory=False, bucket_numel=3000,
                                              chunk_numel=700), num_batches=2)
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a checkpoint folder written by `lightning_offload`"):
        trainer.save_checkpoint(project)
    assert sorted(p.name for p in project.iterdir()) == ["notes.txt"]
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    trainer.save_checkpoint(tmp_path / "last.ckpt")  # its own checkpoint is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "project"]


def test_single_file_checkpoints_go_through_the_trainers_checkpoint_io(tmp_path) -> None:
    from lightning.pytorch.plugins import TorchCheckpointIO as LightningTorchCheckpointIO

    from lightning_offload import SingleGPUOffloadStrategy
    from tests.conftest import fit

    class RecordingIO(LightningTorchCheckpointIO):
        written: list[Path] = []

        def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
            self.written.append(Path(path))
            super().save_checkpoint(checkpoint, path, storage_options)

    _, trainer = fit(SingleGPUOffloadStrategy(backend="device", check_memory=False), num_batches=2,
                     plugins=[RecordingIO()])
    target = tmp_path / "model.ckpt"
    trainer.save_checkpoint(target)
    [written] = RecordingIO.written
    assert written.parent == target.parent and written != target  # staged beside the target, then renamed
    assert "state_dict" in torch.load(target, weights_only=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]


def _checkpoint_folder_check(folder: Path, monkeypatch) -> None:
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_offload.planner import lightning as planner_lightning

    monkeypatch.setattr(planner_lightning, "checkpoint_bytes", lambda stats, plan: 2**20)
    report = SimpleNamespace(chosen=SimpleNamespace(plan="a plan"), stats=SimpleNamespace(parameters=1))
    trainer = SimpleNamespace(callbacks=[ModelCheckpoint(dirpath=folder, save_top_k=1)], default_root_dir=folder)
    planner_lightning.check_checkpoint_disk(trainer, report)


def test_a_fit_removes_what_killed_saves_left_in_its_checkpoint_folder(tmp_path, monkeypatch) -> None:
    dead_pid = _exited_process_id()
    leftover = tmp_path / f".last.ckpt.partial-{saving.socket.gethostname()}-{dead_pid}-0123abcd"
    leftover.mkdir()
    (leftover / "state.pt").write_bytes(b"0" * 1000)
    _checkpoint_folder_check(tmp_path, monkeypatch)
    assert not leftover.exists()


def test_an_unwritable_checkpoint_folder_is_named_before_training(tmp_path, monkeypatch) -> None:
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("")
    with pytest.raises(PermissionError, match=r"cannot write its checkpoints into .* Point `dirpath` at a writable"):
        _checkpoint_folder_check(in_the_way / "checkpoints", monkeypatch)
