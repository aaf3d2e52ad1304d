"""Atomic checkpoint writes: a failed save leaves the previous checkpoint whole and no debris."""

from __future__ import annotations

import pytest
import torch

from lightning_offload import saving
from lightning_offload.saving import FOLDER_MARKER, atomic_directory, atomic_file, consolidate, write_state_dict


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


# ------------------------------------------------------------------------------------------------- consolidate
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


def whole_state_dict(checkpoint) -> dict:
    """The fp32 state dict of a checkpoint, built whole in memory as `consolidate` built it before it streamed."""
    from lightning_offload.backends import host_adam
    from lightning_offload.backends.stream.checkpoint import read_manifest

    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
        return {name: value.float() if value.is_floating_point() else value for name, value in state.items()}
    if (checkpoint / "manifest.json").is_file():
        result = {}
        for entry in read_manifest(checkpoint)["units"]:
            content = torch.load(checkpoint / entry["file"], weights_only=True)
            for names, weight in zip(entry["names"], content["weights"]):
                result.update(dict.fromkeys(names, weight.float()))
        return result
    if (checkpoint / host_adam.CHECKPOINT_FILE).is_file():
        state = host_adam.read_checkpoint(checkpoint)
        result = {}
        for names, (master, _, _) in zip(state["names"], host_adam.saved_parameters(state)):
            result.update(dict.fromkeys(names, master.clone()))
        return {**result, **state["buffers"]}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint)))


# One of each checkpoint format: Lightning's file (cast from bf16), the stream backend's units (bf16), host_adam's
# fp32 arena, DeepSpeed's fp32 partitions.
FORMATS = {
    "device": (dict(backend="device"), "bf16-true"),
    "stream": (dict(backend="stream", check_memory=False, resident_blocks=0, stream_outer=True, build_on_meta=False),
               "bf16-true"),
    "host_adam": (dict(backend="host_adam", check_memory=False, bucket_numel=3000, chunk_numel=700), "bf16-mixed"),
    "deepspeed": (dict(backend="deepspeed"), "32-true"),
}


def saved_checkpoint(tmp_path, backend: str):
    from lightning_offload import SingleGPUOffloadStrategy
    from tests.conftest import fit

    options, precision = FORMATS[backend]
    _, trainer = fit(SingleGPUOffloadStrategy(**options), num_batches=2, precision=precision)
    trainer.save_checkpoint(tmp_path / "trained.ckpt")
    return tmp_path / "trained.ckpt"


@pytest.mark.parametrize("backend", sorted(FORMATS))
def test_consolidate_writes_the_whole_state_dict_one_tensor_at_a_time(tmp_path, backend: str) -> None:
    from tests.conftest import peak_and_final_allocated_bytes

    checkpoint = saved_checkpoint(tmp_path, backend)
    expected = whole_state_dict(checkpoint)
    tensor_bytes = {value.untyped_storage().data_ptr(): value.numel() * 4 for value in expected.values()}
    largest, total = max(tensor_bytes.values()), sum(tensor_bytes.values())

    # Reading maps one file at a time, which the profiler counts as allocated; the largest is the "one shard".
    files = [checkpoint] if checkpoint.is_file() else [f for f in checkpoint.rglob("*") if f.is_file()]
    largest_file = max(f.stat().st_size for f in files)
    held = 0
    if backend == "deepspeed":  # names in the model's order: a tied weight is held from its first name to its last
        held = sum(tensor_bytes[expected[names[0]].untyped_storage().data_ptr()] for names in sharing(expected)
                   if len(names) > 1)
    assert total > held + largest  # the whole model held would exceed the bound below
    # The backend's reader and the writer, as `consolidate` runs them (it then maps the file written, to return it).
    peak, _ = peak_and_final_allocated_bytes(
        lambda: write_state_dict(tmp_path / "streamed.pt", saving._fp32_tensors(checkpoint)))
    assert peak <= largest_file + held + largest
    assert_same_state_dict(torch.load(tmp_path / "streamed.pt", weights_only=True), expected)
    returned = consolidate(checkpoint, tmp_path / "model.pt")
    assert_same_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), expected)
    assert_same_state_dict(returned, expected)
    assert_same_state_dict(consolidate(checkpoint), expected)  # without a file: built in memory


def test_consolidate_prefix_that_matches_nothing_writes_nothing(tmp_path) -> None:
    checkpoint = saved_checkpoint(tmp_path, "device")
    with pytest.raises(ValueError, match="No name .* starts with `prefix='model.'`"):
        consolidate(checkpoint, tmp_path / "model.pt", prefix="model.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trained.ckpt"]
    state_dict = consolidate(checkpoint, tmp_path / "model.pt", prefix="net.")
    assert state_dict and all(not name.startswith("net.") for name in state_dict)
