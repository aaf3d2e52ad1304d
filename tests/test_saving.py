"""Atomic checkpoint writes: a failed save leaves the previous checkpoint whole and no debris."""

from __future__ import annotations

import pytest

from lightning_offload.saving import atomic_directory, atomic_file, consolidate


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
