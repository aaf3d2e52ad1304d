"""Atomic checkpoint writes: a failed save leaves the previous checkpoint whole and no debris."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_offload.saving import (FOLDER_MARKER, atomic_directory, atomic_file, checkpoints_on_disk_at_once,
                                     write_state_dict)


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


def test_streamed_state_dict_loads_as_torch_saves_whole_one(tmp_path) -> None:
    tied = torch.randn(5, 3)
    base = torch.randn(6, 4)
    state_dict = {"embed": tied, "head": tied, "bf16": torch.randn(3).bfloat16(), "steps": torch.arange(7),
                  "flag": torch.tensor([True, False]), "uint16": torch.tensor([1, 2], dtype=torch.uint16),
                  "scalar": torch.tensor(3.0), "transposed": base.t(), "row": base[2], "empty": torch.empty(0, 4)}
    torch.save(state_dict, tmp_path / "whole.pt")
    assert write_state_dict(tmp_path / "streamed.pt", iter(state_dict.items())) == len(state_dict)
    for options in ({}, {"mmap": True, "weights_only": True}):
        assert_same_state_dict(torch.load(tmp_path / "streamed.pt", **options),
                               torch.load(tmp_path / "whole.pt", **options), check_sharing=False)
    streamed = torch.load(tmp_path / "streamed.pt", weights_only=True)
    assert streamed["embed"].data_ptr() == streamed["head"].data_ptr()


def assert_same_state_dict(got: dict, expected: dict, check_sharing: bool = True) -> None:
    """Same names in the same order, dtypes, shapes and bytes; with `check_sharing`, the same names share memory."""
    assert list(got) == list(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        assert torch.equal(got[name].contiguous().view(-1).view(torch.uint8),
                           value.contiguous().view(-1).view(torch.uint8)), name
    if check_sharing:
        assert sharing(got) == sharing(expected)


def sharing(state_dict: dict) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, value in state_dict.items():
        groups.setdefault(value.untyped_storage().data_ptr(), []).append(name)
    return sorted(groups.values())


def test_a_removal_killed_mid_way_leaves_nothing_under_the_checkpoints_name(tmp_path, monkeypatch) -> None:
    from lightning_offload import saving

    target = tmp_path / "epoch=0.ckpt"
    with atomic_directory(target) as staging:
        (staging / "weights").write_text("old best")
    monkeypatch.setattr(saving, "_remove", lambda path: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        saving.remove_checkpoint(target)
    assert not target.exists()
    monkeypatch.undo()
    # What the killed removal left is removed by the next save or fit, not put back.
    saving.remove_stale_leftovers(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_weights_only_folder_is_marked(tmp_path) -> None:
    from lightning_offload.saving import holds_weights_only

    with atomic_directory(tmp_path / "full.ckpt"):
        pass
    with atomic_directory(tmp_path / "weights.ckpt", weights_only=True):
        pass
    assert not holds_weights_only(tmp_path / "full.ckpt")
    assert holds_weights_only(tmp_path / "weights.ckpt")


def test_a_streamed_state_dict_can_be_written_inside_another_object(tmp_path) -> None:
    weight, buffer = torch.randn(3, 4), torch.arange(5)
    write_state_dict(tmp_path / "model.ckpt", [("weight", weight), ("row", weight[1])],
                     around=lambda state_dict: {"epoch": 2, "buffers": [buffer], "state_dict": state_dict})
    loaded = torch.load(tmp_path / "model.ckpt", weights_only=True)
    assert loaded["epoch"] == 2 and torch.equal(loaded["buffers"][0], buffer)
    assert torch.equal(loaded["state_dict"]["weight"], weight) and torch.equal(loaded["state_dict"]["row"], weight[1])


def tagged_on(location: str, checkpoint: dict[str, Any], path: Path) -> None:
    """Writes `checkpoint` as `torch.save` does from a run whose tensors are on `location`: each storage tagged so."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: location)
        torch.save(checkpoint, path)


def storage_tags(path: Path) -> tuple[set[str], set[str]]:
    """The location tags of the storages in Lightning's file `path`: its state dict's, and the others'."""
    tags: dict[int, str] = {}

    def noted(storage: torch.UntypedStorage, location: str) -> torch.UntypedStorage:
        tags[storage._cdata] = location
        return storage

    checkpoint = torch.load(path, map_location=noted, weights_only=False)
    weights = {tensor.untyped_storage()._cdata for tensor in checkpoint["state_dict"].values()}
    return {tags[key] for key in weights}, {tag for key, tag in tags.items() if key not in weights}


@pytest.mark.parametrize("location", ["cpu", "cuda:0"])
def test_a_streamed_state_dict_is_tagged_at_its_location_and_the_tensors_beside_it_in_host_memory(
        tmp_path, location: str) -> None:
    weight, buffer = torch.randn(3, 4), torch.arange(5)
    write_state_dict(tmp_path / "model.ckpt", [("weight", weight), ("row", weight[1])], location=location,
                     around=lambda state_dict: {"buffers": [buffer], "state_dict": state_dict})
    assert storage_tags(tmp_path / "model.ckpt") == ({location}, {"cpu"})
    loaded = torch.load(tmp_path / "model.ckpt", map_location="cpu", weights_only=True)
    assert torch.equal(loaded["state_dict"]["weight"], weight) and torch.equal(loaded["buffers"][0], buffer)
