"""The planner and disks: probing a folder, `deepspeed` plans with state on NVMe, the disk-bound refusal."""

from __future__ import annotations

import dataclasses

import pytest

from lightning_offload.planner import Ceilings, Disk, Machine, Plan, estimate_memory
from lightning_offload.planner import disk as disk_module
from lightning_offload.planner.choose import DISK_BOUND_FACTOR, candidate_plans, choose
from lightning_offload.backends.deepspeed import disk_traffic
from lightning_offload.planner.cost import estimate_step_time
from lightning_offload.planner.memory import GIB, OPTIMIZER_STATE_BYTES
from tests.planner.test_memory import LLAMA_8B

# The H100 machine's drive (bench/device_setup.sh's box): ~1.9 GB/s read, ~1.5 GB/s write.
NVME = Disk(path="/nvme", read_gbps=1.9, write_gbps=1.5, free_bytes=2000 * GIB)
# Host RAM too small for ZeRO-3's 18 bytes/param of an 8B model in host memory, large enough without the optimizer's.
SMALL_HOST = Machine(gpu_memory_gib=79.2, host_memory_gib=120)


def deepspeed_plans(**levers):
    return candidate_plans(LLAMA_8B, backends=["deepspeed"], on_cuda=True, optimizer="cpu_adam",
                           checkpointing="full", **levers)


def test_probe_reads_and_writes_the_folder_and_leaves_nothing(tmp_path) -> None:
    read, write = disk_module.probe_disk(tmp_path, nbytes=4 * 2**20)
    assert read > 0 and write > 0
    assert list(tmp_path.iterdir()) == []


def test_probed_rates_are_cached_per_filesystem_and_free_space_read_each_time(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LIGHTNING_OFFLOAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(disk_module, "probe_disk", lambda path: (1.25, 0.75))
    first = disk_module.load_or_probe_disk(tmp_path)
    monkeypatch.setattr(disk_module, "probe_disk", lambda path: pytest.fail("probed twice"))
    second = disk_module.load_or_probe_disk(tmp_path)
    assert (second.read_gbps, second.write_gbps) == (first.read_gbps, first.write_gbps) == (1.25, 0.75)
    assert second.free_bytes > 0


def test_state_goes_to_disk_only_where_the_user_gave_one() -> None:
    assert not any(p.on_disk for p in deepspeed_plans())
    offered = {(p.offload_device, p.nvme_state) for p in deepspeed_plans(disk_given=True)}
    assert offered == {("cpu", "all"), ("nvme", "all"), ("nvme", "parameters"), ("nvme", "optimizer")}
    assert {p.nvme_state for p in deepspeed_plans(disk_given=True, offload_device="nvme",
                                                  nvme_state="optimizer")} == {"optimizer"}


def test_optimizer_state_on_disk_leaves_host_memory_for_the_disk() -> None:
    params = LLAMA_8B.parameters
    in_host = estimate_memory(LLAMA_8B, Plan(backend="deepspeed", optimizer="cpu_adam"))
    on_disk = estimate_memory(LLAMA_8B, Plan(backend="deepspeed", optimizer="cpu_adam", offload_device="nvme",
                                             nvme_state="optimizer"))
    moved = (4 + OPTIMIZER_STATE_BYTES["cpu_adam"]) * params  # fp32 master weights and Adam moments
    assert on_disk.disk == {"fp32 master weights": 4 * params, "optimizer state": 8 * params,
                            "fp32 gradients": 4 * params}
    assert in_host.host_bytes - on_disk.host_bytes == moved - on_disk.host["optimizer swap buffers"]
    assert on_disk.gpu == in_host.gpu


def test_disk_traffic_per_step_counts_every_gather_and_the_update() -> None:
    params = LLAMA_8B.parameters
    plan = Plan(backend="deepspeed", optimizer="cpu_adam", offload_device="nvme", nvme_state="all")
    parameter_reads, reads, writes = disk_traffic(LLAMA_8B, plan, accumulate=2)
    on_disk = estimate_memory(LLAMA_8B, plan).disk["weight partitions"]
    assert parameter_reads == 2 * 3 * on_disk  # two micro-batches of forward, recompute and backward
    assert reads == 16 * params and writes == on_disk + 16 * params
    assert disk_traffic(LLAMA_8B, Plan(backend="deepspeed", optimizer="cpu_adam")) == (0, 0, 0)


def test_host_memory_short_takes_the_pinned_disk_and_the_table_says_what_it_writes() -> None:
    without = choose(LLAMA_8B, SMALL_HOST, Ceilings(), deepspeed_plans())
    assert without.chosen is None
    report = choose(LLAMA_8B, SMALL_HOST, Ceilings(), deepspeed_plans(disk_given=True, offload_device="nvme"),
                    disk=NVME, disk_pinned=True)
    assert report.chosen is not None and report.chosen.plan.on_disk
    step = report.chosen.step_time
    assert step.disk > 0 and step.total > estimate_step_time(
        LLAMA_8B, dataclasses.replace(report.chosen.plan, offload_device="cpu"), Ceilings()).total
    table = report.table()
    assert "disk GiB" in table and "TB/1k steps" in table and NVME.path in table
    assert f"{step.disk_write_bytes / 1e9:.1f}" in table


def test_a_disk_too_small_is_a_shortfall() -> None:
    tiny = dataclasses.replace(NVME, free_bytes=10 * GIB)
    report = choose(LLAMA_8B, SMALL_HOST, Ceilings(), deepspeed_plans(disk_given=True, offload_device="nvme",
                                                                      nvme_state="all"), disk=tiny, disk_pinned=True)
    assert report.chosen is None
    assert "disk short by" in str(report.error()) and tiny.path in str(report.error())


def test_a_disk_bound_step_is_refused_unless_pinned() -> None:
    # 8B at 8,192 tokens/step: the update reads and writes 16 bytes/param at ~1.5-1.9 GB/s against ~1.3 s of compute.
    plans = deepspeed_plans(disk_given=True, offload_device="nvme", nvme_state="optimizer")
    refused = choose(LLAMA_8B, SMALL_HOST, Ceilings(), plans, disk=NVME)
    candidate = refused.candidates[0]
    assert refused.chosen is None and not candidate.shortfalls
    assert candidate.step_time.disk > (DISK_BOUND_FACTOR - 1) * candidate.step_time.compute
    assert "disk traffic" in str(refused.error()) and "offload_device='nvme'" in candidate.refused
    pinned = choose(LLAMA_8B, SMALL_HOST, Ceilings(), plans, disk=NVME, disk_pinned=True)
    assert pinned.chosen is not None and pinned.chosen.plan.nvme_state == "optimizer"


def test_the_same_disk_traffic_under_a_long_step_is_taken() -> None:
    # 128 micro-batches per step: the once-per-step update's disk traffic stays under the compute it follows.
    plans = deepspeed_plans(disk_given=True, offload_device="nvme", nvme_state="optimizer", accumulate=128)
    report = choose(LLAMA_8B, SMALL_HOST, Ceilings(), plans, disk=NVME, accumulate=128)
    assert report.chosen is not None
    assert report.chosen.step_time.disk <= (DISK_BOUND_FACTOR - 1) * report.chosen.step_time.compute
