"""The streaming plan's disk tier on CPU: some blocks' 8-bit state in files, read ahead and written back around their
update with DeepSpeed's async I/O op; the same arithmetic as with all state in host memory."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_offload
from lightning_offload import SingleGPUOffloadStrategy
from lightning_offload.backends.stream.lanes import Lanes
from lightning_offload.backends.stream.placement import (
    DISK_PAGE,
    UnitSize,
    check_host_memory,
    measure,
    place_state_on_disk,
)
from lightning_offload.backends.stream.spec import disk_seconds, disk_tier_bytes
from lightning_offload.planner.budget import GIB
from lightning_offload.planner.disk import UnusableDisk
from tests.backends.test_stream import ALL_STREAMED, backend_of, stream, unordered_uses
from tests.conftest import TinyLM, fit

BLOCKS = 2  # TinyLM's


@pytest.fixture
def _async_io() -> None:
    pytest.importorskip("deepspeed")
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        pytest.skip("DeepSpeed's async I/O op needs libaio (`apt-get install libaio-dev`)")


# The tests that read and write the disk tier (the placement and planner tests need no I/O).
needs_async_io = pytest.mark.usefixtures("_async_io")


def on_disk(tmp_path: Path, blocks: int = BLOCKS, **options) -> SingleGPUOffloadStrategy:
    folder = tmp_path / "nvme"
    folder.mkdir(exist_ok=True)
    return stream(nvme_path=str(folder), disk_blocks=blocks, **options)


def files_of(trainer) -> list[Path]:
    return sorted(Path(backend_of(trainer).disk.folder).iterdir())


# ---------------------------------------------------------------------------------------------- placement
def units(blocks: int = 8) -> list[UnitSize]:
    return [UnitSize(GIB, GIB, False), *(UnitSize(GIB, GIB, True) for _ in range(blocks)), UnitSize(GIB, GIB, False)]


def test_the_fewest_blocks_go_to_disk_spread_over_the_model() -> None:
    sizes = units()
    everything_on_host = measure(sizes, frozenset(range(1, 9)), weight_slots=3, state_slots=3, accumulate=1)
    assert place_state_on_disk(sizes, everything_on_host, host_free_bytes=everything_on_host.host_pinned_bytes
                               ).on_disk == frozenset()
    # Each block on disk frees its state from the host but the first costs the staging buffers: 4 GiB over,
    # buffers included, needs 8 blocks' state moved.
    squeezed = place_state_on_disk(sizes, everything_on_host,
                                   host_free_bytes=everything_on_host.host_pinned_bytes - 4 * GIB, disk_buffers=4)
    assert len(squeezed.on_disk) == 8 and squeezed.disk_bytes == 8 * GIB and squeezed.staging_bytes == 4 * GIB
    assert squeezed.host_pinned_bytes == everything_on_host.host_pinned_bytes - 4 * GIB
    half = place_state_on_disk(sizes, everything_on_host, host_free_bytes=0, disk_blocks=4)
    assert half.on_disk == frozenset({2, 4, 6, 8})  # every other block, between those on the host
    with pytest.raises(ValueError, match="disk_blocks=9"):
        place_state_on_disk(sizes, everything_on_host, host_free_bytes=0, disk_blocks=9)


def test_host_refusal_names_the_disk_tier() -> None:
    sizes = units()
    placement = place_state_on_disk(sizes, measure(sizes, frozenset(), weight_slots=3, state_slots=3, accumulate=1),
                                    host_free_bytes=0, disk_blocks=8)
    with pytest.raises(MemoryError, match=r"8 blocks' state on disk through 4\.0 GiB of staging buffers"):
        check_host_memory(placement, available_bytes=GIB, reserve_bytes=0)
    with pytest.raises(MemoryError, match="nvme_path"):
        check_host_memory(measure(sizes, frozenset(), weight_slots=3, state_slots=3, accumulate=1),
                          available_bytes=GIB, reserve_bytes=0)


def test_planner_terms() -> None:
    moved, staging = disk_tier_bytes(GIB + 1, 3, disk_buffers=4)
    assert moved == 3 * (GIB + DISK_PAGE) and staging == 4 * (GIB + DISK_PAGE)
    assert disk_tier_bytes(GIB, 0) == (0, 0)
    # 2 GB read at 2 GB/s and written at 1 GB/s: 3 s of disk, 1 s of it beyond 2 s of backward.
    assert disk_seconds(2 * 10**9, read_gbps=2.0, write_gbps=1.0, backward_seconds=2.0) == (1.0, 2 * 10**9, 2 * 10**9)
    assert disk_seconds(2 * 10**9, read_gbps=2.0, write_gbps=1.0, backward_seconds=5.0)[0] == 0.0


# ---------------------------------------------------------------------------------------------- training
@needs_async_io
@pytest.mark.parametrize("resident", [False, True], ids=["weights-streamed", "weights-resident"])
def test_state_on_disk_trains_bitwise_like_state_in_host_memory(tmp_path, resident) -> None:
    layout = dict(resident_blocks=BLOCKS, stream_outer=False) if resident else {}
    in_ram, ram_trainer = fit(stream(**layout), precision="bf16-true", num_batches=4)
    on_disk_module, trainer = fit(on_disk(tmp_path, **layout), precision="bf16-true", num_batches=4)
    assert on_disk_module.losses == in_ram.losses
    assert on_disk_module.losses[-1] != on_disk_module.losses[0]
    for a, b in zip(on_disk_module.parameters(), in_ram.parameters(), strict=True):
        assert torch.equal(a, b)
    backend = backend_of(trainer)
    blocks = [u for u in backend.units if u.is_block]
    assert all(u.on_disk and u.host_state is None for u in blocks)
    # The files hold the state the host arena holds in the RAM-only run.
    ram_blocks = [u for u in backend_of(ram_trainer).units if u.is_block]
    for unit, ram_unit in zip(blocks, ram_blocks, strict=True):
        assert torch.equal(backend.disk.read(unit), ram_unit.host_state)
    assert [f.stat().st_size for f in files_of(trainer)] == [-(-u.state_bytes // DISK_PAGE) * DISK_PAGE
                                                             for u in blocks]


class PartlyFrozenLM(TinyLM):
    """The first block's MLP input layer frozen and left out of the optimizer: that block's state is pages smaller
    than the other's."""

    def configure_model(self) -> None:
        super().configure_model()
        self.net.blocks[0].mlp[0].weight.requires_grad_(False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


@needs_async_io
def test_blocks_of_different_state_sizes_share_the_staging_buffers(tmp_path) -> None:
    in_ram, _ = fit(stream(), module=PartlyFrozenLM(), precision="bf16-true", num_batches=3)
    module, trainer = fit(on_disk(tmp_path), module=PartlyFrozenLM(), precision="bf16-true", num_batches=3)
    assert module.losses == in_ram.losses
    sizes = [f.stat().st_size for f in files_of(trainer)]
    assert len(set(sizes)) == 2 and all(size % DISK_PAGE == 0 for size in sizes)


@needs_async_io
def test_accumulating_reads_and_writes_once_per_optimizer_step(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(Lanes, "start_step", lambda self: None)
    in_ram, _ = fit(stream(), precision="bf16-true", num_batches=4, accumulate_grad_batches=2)
    module, trainer = fit(on_disk(tmp_path), precision="bf16-true", num_batches=4, accumulate_grad_batches=2)
    assert module.losses == in_ram.losses
    backend = backend_of(trainer)
    files = [f"file state {u.index}" for u in backend.units if u.on_disk]
    assert len(files) == BLOCKS
    for kind in ("read", "write"):  # a disk read reads the file, a disk write writes it
        touched = [label for action, lane, label in backend.lanes.log if lane.startswith("disk") and action == kind
                   and label.startswith("file")]
        assert sorted(touched) == sorted(files * 2)  # two optimizer steps of two micro-batches each


# ---------------------------------------------------------------------------------------------- ordering
def disk_events(log: list[tuple[str, str, str]], unit: int) -> list[tuple[int, str]]:
    """(position, 'read' | 'write') of each disk request on `unit`'s file (a disk read reads the file, a disk write
    writes it), and (position, 'update') of each of its updates, in log order."""
    events = [(i, action) for i, (action, lane, label) in enumerate(log)
              if lane.startswith("disk") and label == f"file state {unit}" and action in ("read", "write")]
    events += [(i, "update") for i, entry in enumerate(log) if entry == ("update", "compute", str(unit))]
    return sorted(events)


@needs_async_io
@pytest.mark.parametrize(("slots", "buffers", "accumulate"),
                         [((2, 2), 3, 1), ((3, 3), 4, 1), ((4, 5), 6, 1), ((2, 2), 3, 2)],
                         ids=["fewest-buffers", "default-buffers", "every-unit-cached", "accumulating"])
def test_each_blocks_state_is_read_before_its_update_and_written_after(tmp_path, monkeypatch, slots, buffers,
                                                                       accumulate) -> None:
    # Keep the whole run's log: a write in one step and the read in the next must be ordered too.
    monkeypatch.setattr(Lanes, "start_step", lambda self: None)
    weight_slots, state_slots = slots
    _, trainer = fit(on_disk(tmp_path, weight_slots=weight_slots, state_slots=state_slots, disk_buffers=buffers),
                     precision="bf16-true", num_batches=3 * accumulate, accumulate_grad_batches=accumulate)
    backend = backend_of(trainer)
    log = backend.lanes.log
    for unit in (u for u in backend.units if u.on_disk):
        events = [kind for _, kind in disk_events(log, unit.index)]
        # Each step: read, update, write; the state slot may keep the block from one step to the next (no read).
        assert events.count("update") == 3 and events.count("write") == 3
        assert events[0] == "read" and events[-1] == "write"
        for before, after in zip(events, events[1:]):
            assert (before, after) in {("read", "update"), ("update", "write"), ("write", "read"),
                                       ("write", "update")}
    # Every buffer, file, slot and host region used on two lanes, one of them writing, is ordered by an event: in
    # particular a file is never read while its write is in flight, and a buffer never refilled before its write.
    assert unordered_uses(log) == []
    assert any(lane.startswith("disk") and action == "wait" for action, lane, _ in log)


def test_race_check_sees_a_read_of_a_file_whose_write_is_in_flight() -> None:
    log = [("write", "d2h", "disk buffer 0"), ("record", "d2h", "saved 1"), ("wait", "disk 0", "saved 1"),
           ("read", "disk 0", "disk buffer 0"), ("write", "disk 0", "file state 1"),
           ("record", "disk 0", "written 1"), ("wait", "disk 1", "written 1"),
           ("read", "disk 1", "file state 1"), ("write", "disk 1", "disk buffer 1")]
    assert unordered_uses(log) == []
    assert len(unordered_uses([e for e in log if e != ("wait", "disk 1", "written 1")])) == 1
    assert len(unordered_uses([e for e in log if e != ("wait", "disk 0", "saved 1")])) == 1


# ---------------------------------------------------------------------------------------------- checkpoints
def disk_state(trainer) -> dict[int, torch.Tensor]:
    """Each block's 8-bit state records as its file holds them."""
    backend = backend_of(trainer)
    return {unit.index: backend.disk.read(unit) for unit in backend.units if unit.on_disk}


@needs_async_io
def test_resume_from_a_checkpoint_with_state_on_disk_is_exact(tmp_path) -> None:
    options = dict(precision="bf16-true", num_batches=2, max_epochs=2)
    callback = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=2, save_top_k=-1)
    uninterrupted, first = fit(on_disk(tmp_path, build_on_meta=True, resident_blocks=1),
                               module=TinyLM(scheduler="step"), enable_checkpointing=True, callbacks=[callback],
                               **options)
    expected = disk_state(first)  # read before the next fit releases this one's files
    assert len(expected) == BLOCKS
    checkpoint = tmp_path / "checkpoints" / "epoch=0-step=2.ckpt"
    resumed, second = fit(on_disk(tmp_path, build_on_meta=True, resident_blocks=1),
                          module=TinyLM(scheduler="step"), ckpt_path=str(checkpoint), **options)
    assert resumed.losses == uninterrupted.losses[2:]
    assert uninterrupted.losses[2] != uninterrupted.losses[0]  # epoch 2 repeats epoch 1's batches on new weights
    for a, b in zip(resumed.parameters(), uninterrupted.parameters(), strict=True):
        assert torch.equal(a, b)
    resumed_state = disk_state(second)
    assert resumed_state.keys() == expected.keys()
    assert all(torch.equal(resumed_state[i], expected[i]) for i in expected)
    # The same checkpoint resumes with all state in host memory: it holds the state, wherever it lived.
    in_ram, third = fit(stream(build_on_meta=True, resident_blocks=1), module=TinyLM(scheduler="step"),
                        ckpt_path=str(checkpoint), **options)
    assert in_ram.losses == uninterrupted.losses[2:]
    in_host = {u.index: u.host_state for u in backend_of(third).units}
    assert all(torch.equal(in_host[i], expected[i]) for i in expected)


@needs_async_io
def test_consolidate_reads_a_checkpoint_with_state_on_disk(tmp_path) -> None:
    _, ram_trainer = fit(stream(), precision="bf16-true", num_batches=2)
    ram_trainer.save_checkpoint(tmp_path / "ram.ckpt")
    _, trainer = fit(on_disk(tmp_path), precision="bf16-true", num_batches=2)
    trainer.save_checkpoint(tmp_path / "disk.ckpt")
    from_disk = lightning_offload.consolidate(tmp_path / "disk.ckpt", tmp_path / "disk.pt")
    from_ram = lightning_offload.consolidate(tmp_path / "ram.ckpt", tmp_path / "ram.pt")
    assert from_disk.keys() == from_ram.keys() and all(torch.equal(from_disk[k], from_ram[k]) for k in from_ram)
    saved = torch.load(tmp_path / "disk.ckpt" / "unit_0001.pt", weights_only=True)["state"]
    expected = torch.load(tmp_path / "ram.ckpt" / "unit_0001.pt", weights_only=True)["state"]
    assert len(saved) == len(expected) and all(torch.equal(a, b) for a, b in zip(saved, expected))


@needs_async_io
def test_the_swap_folder_is_removed_with_the_backend(tmp_path) -> None:
    _, trainer = fit(on_disk(tmp_path), precision="bf16-true", num_batches=1)
    folder = Path(backend_of(trainer).disk.folder)
    assert folder.parent == tmp_path / "nvme" and len(files_of(trainer)) == BLOCKS
    backend_of(trainer).release()
    assert not folder.exists()


# ---------------------------------------------------------------------------------------------- refusals
def test_bad_paths_are_refused_at_setup(tmp_path) -> None:
    with pytest.raises(UnusableDisk, match="does not exist"):
        fit(stream(nvme_path=str(tmp_path / "missing"), disk_blocks=1), precision="bf16-true", num_batches=1)
    (tmp_path / "file").write_text("")
    with pytest.raises(UnusableDisk, match="is a file"):
        fit(stream(nvme_path=str(tmp_path / "file"), disk_blocks=1), precision="bf16-true", num_batches=1)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UnusableDisk, match="not writable"):
            fit(stream(nvme_path=str(locked), disk_blocks=1), precision="bf16-true", num_batches=1)


def test_a_disk_too_small_is_refused_with_the_numbers(tmp_path, monkeypatch) -> None:
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=DISK_PAGE))
    with pytest.raises(UnusableDisk, match=r"has 0\.00 MiB free but the optimizer state of 2 blocks .* needs"):
        fit(on_disk(tmp_path), precision="bf16-true", num_batches=1)


def test_disk_options_are_checked() -> None:
    with pytest.raises(ValueError, match="needs a folder"):
        SingleGPUOffloadStrategy(backend="stream", disk_blocks=2, **ALL_STREAMED)
    with pytest.raises(ValueError, match="disk_buffers=2"):
        SingleGPUOffloadStrategy(backend="stream", nvme_path="/tmp", disk_buffers=2, **ALL_STREAMED)


# ---------------------------------------------------------------------------------------------- the planner
def stream_report(host_gib: float, *, accumulate: int = 1, disk_blocks: int | None = None, pinned: bool = False):
    from lightning_offload.planner import Ceilings, Machine
    from lightning_offload.planner.choose import candidate_plans, choose
    from tests.planner.test_disk import NVME
    from tests.planner.test_memory import LLAMA_8B

    plans = candidate_plans(LLAMA_8B, backends=["stream"], on_cuda=True, checkpointing="full", disk_given=True,
                            disk_blocks=disk_blocks)
    return choose(LLAMA_8B, Machine(gpu_memory_gib=79.2, host_memory_gib=host_gib), Ceilings(), plans,
                  accumulate=accumulate, allow_eight_bit=True, disk=NVME, disk_pinned=pinned)


def test_planner_puts_the_fewest_blocks_state_on_disk_when_host_memory_is_short() -> None:
    from lightning_offload.planner import estimate_memory, shortfalls
    from tests.planner.test_memory import LLAMA_8B

    # 64 micro-batches per step: the once-per-step reads and writes (under the last backward) add little to it.
    report = stream_report(12, accumulate=64)
    chosen = report.chosen
    assert chosen is not None and chosen.plan.disk_blocks
    assert 0 < chosen.step_time.disk < chosen.step_time.compute / 2
    memory = chosen.memory
    block_state = memory.disk["8-bit optimizer state (blocks on disk)"] // chosen.plan.disk_blocks
    assert memory.host["disk staging buffers"] == 4 * block_state
    assert chosen.step_time.disk_write_bytes == chosen.step_time.disk_read_bytes == memory.disk_bytes
    one_fewer = dataclasses.replace(chosen.plan, disk_blocks=chosen.plan.disk_blocks - 1)
    assert "host RAM" in shortfalls(estimate_memory(LLAMA_8B, one_fewer, accumulate=64), report.machine,
                                    exact_host_bytes=estimate_memory(LLAMA_8B, one_fewer).pinned_bytes)
    table = report.table()
    assert "blocks' state on NVMe" in table and f"{chosen.step_time.disk_write_bytes / 1e9:.1f}" in table
    assert stream_report(125, accumulate=64).chosen.plan.disk_blocks == 0  # host memory holds it: no disk


def test_planner_refuses_a_disk_bound_stream_plan_unless_pinned() -> None:
    refused = stream_report(12)
    candidate = next(c for c in refused.candidates if c.plan.disk_blocks)
    assert refused.chosen is None and not candidate.shortfalls and "disk_blocks" in candidate.refused
    assert candidate.step_time.disk > candidate.step_time.compute
    pinned = stream_report(12, disk_blocks=candidate.plan.disk_blocks, pinned=True)
    assert pinned.chosen is not None and pinned.chosen.plan.disk_blocks == candidate.plan.disk_blocks


@needs_async_io
def test_a_pinned_stream_backend_takes_the_planners_blocks_on_disk(tmp_path, monkeypatch) -> None:
    import lightning_offload.planner as planner_module
    import lightning_offload.strategy as strategy_module
    from tests.planner.test_disk import NVME

    folder = tmp_path / "nvme"
    folder.mkdir()
    seen = {}

    def probed(path):  # the planner's disk probe writes a GiB: its numbers stand in
        seen["probed"] = str(path)
        return dataclasses.replace(NVME, path=str(path))

    monkeypatch.setattr(planner_module, "load_or_probe_disk", probed)
    planned = strategy_module.plan_for_trainer

    def one_block_on_disk(*args, **kwargs):
        report = planned(*args, **kwargs)
        chosen = next(c for c in report.candidates if c.plan.checkpointing == "full")
        plan = dataclasses.replace(chosen.plan, resident_blocks=BLOCKS, disk_blocks=1)
        return dataclasses.replace(report, chosen=dataclasses.replace(chosen, plan=plan))

    monkeypatch.setattr(strategy_module, "plan_for_trainer", one_block_on_disk)
    _, trainer = fit(SingleGPUOffloadStrategy(backend="stream", build_on_meta=False, nvme_path=str(folder)),
                     num_batches=1, precision="bf16-true")
    assert seen["probed"] == str(folder)
    backend = backend_of(trainer)
    assert len(backend.placement.on_disk) == 1 and len(files_of(trainer)) == 1


def test_planner_keeps_the_most_blocks_the_gpu_holds_beside_the_disk_tier() -> None:
    from lightning_offload.planner import Ceilings, Machine, estimate_memory, shortfalls
    from lightning_offload.planner.choose import candidate_plans, choose
    from tests.planner.test_disk import NVME
    from tests.planner.test_memory import LLAMA_8B

    # A 24 GiB card: each resident block costs GPU memory and saves host memory, which the disk can take instead.
    machine = Machine(gpu_memory_gib=24, host_memory_gib=24)
    plans = candidate_plans(LLAMA_8B, backends=["stream"], on_cuda=True, checkpointing="full", disk_given=True)
    report = choose(LLAMA_8B, machine, Ceilings(), plans, allow_eight_bit=True, disk=NVME, disk_pinned=True)
    chosen = report.chosen
    assert chosen is not None and chosen.plan.disk_blocks and not chosen.shortfalls

    def gpu_short(resident: int) -> bool:
        plan = dataclasses.replace(chosen.plan, resident_blocks=resident)
        return "GPU" in shortfalls(estimate_memory(LLAMA_8B, plan), machine)

    assert 0 < chosen.plan.resident_blocks < LLAMA_8B.blocks
    assert not gpu_short(chosen.plan.resident_blocks) and gpu_short(chosen.plan.resident_blocks + 1)
