"""Atomic checkpoint writes: a failed save leaves the previous checkpoint whole and no debris."""

from __future__ import annotations

import pytest

from lightning_offload.consolidation import consolidate
from lightning_offload.saving import FOLDER_MARKER, atomic_directory, atomic_file, checkpoints_on_disk_at_once


def test_failed_directory_save_keeps_previous_checkpoint(tmp_path) -> None:
    target = tmp_path / "last.ckpt"
    with atomic_directory(target) as staging:
        (staging / "weights").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_directory(target) as staging:
            (staging / "weights").write_text("half")
            raise OSError("disk full")
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_directory_save_replaces_previous_checkpoint(tmp_path) -> None:
    target = tmp_path / "last.ckpt"
    for content in ("first", "second"):
        with atomic_directory(target) as staging:
            (staging / "weights").write_text(content)
    assert (target / "weights").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_file_save_is_atomic(tmp_path) -> None:
    target = tmp_path / "model.pt"
    with atomic_file(target) as staging:
        staging.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as staging:
            staging.write_text("new")
            raise RuntimeError
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_consolidate_names_a_wrong_folder(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not a `single_gpu_offload` checkpoint folder"):
        consolidate(tmp_path)


class _FakeRanks:
    """Two ranks played in turn by one process: the first broadcast's value reaches every rank."""

    def __init__(self, shared: dict, is_global_zero: bool) -> None:
        self.shared, self.is_global_zero = shared, is_global_zero

    def broadcast(self, obj, src=0):
        return self.shared.setdefault("value", obj)

    def barrier(self, name=None) -> None:
        pass


def test_ranks_write_into_one_staging_folder_that_rank_zero_moves(tmp_path) -> None:
    target, shared = tmp_path / "last.ckpt", {}
    with atomic_directory(target, ranks=_FakeRanks(shared, is_global_zero=True)) as lead:
        with atomic_directory(target, ranks=_FakeRanks(shared, is_global_zero=False)) as follower:
            assert follower == lead and lead.is_dir()
            (follower / "shard1").write_text("1")
        assert not target.exists()  # a rank other than 0 never moves the folder
        (lead / "shard0").write_text("0")
    assert sorted(p.name for p in target.iterdir()) == sorted([FOLDER_MARKER, "shard0", "shard1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_model_checkpoint_holds_what_it_keeps_last_and_the_save_being_written() -> None:
    kept_one = checkpoints_on_disk_at_once(1, False)
    assert kept_one == 1 + 1  # the kept one, and its replacement written beside it
    assert checkpoints_on_disk_at_once(1, True) == kept_one + 1
    assert checkpoints_on_disk_at_once(0, True) == kept_one  # `last` alone is replaced like a kept one
    assert checkpoints_on_disk_at_once(-1, False) > checkpoints_on_disk_at_once(1, False)
    assert checkpoints_on_disk_at_once(0, False) == 0
