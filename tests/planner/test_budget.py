"""The memory a job may use: cgroup limits (v1, v2) and explicit budgets lower the planner's machine, never raise it."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import psutil
import pytest
import torch

from lightning_offload import SingleGPUOffloadStrategy
from lightning_offload.planner import GIB, Ceilings, Machine, PlanDoesNotFit, Plan, RunNeeds, estimate_memory, plan
from lightning_offload.planner import budget
from lightning_offload.planner.budget import cgroup_memory_room, host_memory_available
from tests.conftest import fit
from tests.planner.test_memory import LLAMA_8B

# What the v1 kernel writes in `memory.limit_in_bytes` when there is no limit.
V1_UNLIMITED = 9223372036854771712


def fake_cgroup(tmp_path: Path, membership: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup file system under `tmp_path`: `files` maps paths below its root to contents, `membership` is
    `/proc/self/cgroup`'s text."""
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(membership)
    return root, proc


def test_cgroup_v2_room_is_the_limit_less_what_the_job_uses_beyond_reclaimable_cache(tmp_path) -> None:
    root, proc = fake_cgroup(tmp_path, "0::/user.slice/job_1\n", {
        "user.slice/memory.max": "max\n",
        "user.slice/job_1/memory.max": f"{8 * GIB}\n",
        "user.slice/job_1/memory.current": f"{3 * GIB}\n",
        "user.slice/job_1/memory.stat": f"anon {2 * GIB}\ninactive_file {GIB}\n",
    })
    assert cgroup_memory_room(root, proc) == (8 - (3 - 1)) * GIB


def test_the_tightest_limit_among_the_cgroups_ancestors_wins(tmp_path) -> None:
    root, proc = fake_cgroup(tmp_path, "0::/user.slice/job_1\n", {
        "user.slice/memory.max": f"{4 * GIB}\n", "user.slice/memory.current": f"{GIB}\n",
        "user.slice/job_1/memory.max": f"{8 * GIB}\n", "user.slice/job_1/memory.current": f"{GIB}\n",
    })
    assert cgroup_memory_room(root, proc) == 3 * GIB


def test_cgroup_v1_memory_controller_and_its_unlimited_value(tmp_path) -> None:
    membership = "5:cpu,cpuacct:/slurm/job_7\n4:memory:/slurm/job_7\n"
    root, proc = fake_cgroup(tmp_path, membership, {
        "memory/slurm/job_7/memory.limit_in_bytes": f"{64 * GIB}\n",
        "memory/slurm/job_7/memory.usage_in_bytes": f"{10 * GIB}\n",
        "memory/slurm/job_7/memory.stat": f"cache {4 * GIB}\ntotal_inactive_file {2 * GIB}\n",
        "memory/slurm/memory.limit_in_bytes": f"{V1_UNLIMITED}\n",
        "memory/memory.limit_in_bytes": f"{V1_UNLIMITED}\n",
    })
    assert cgroup_memory_room(root, proc) == (64 - (10 - 2)) * GIB
    unlimited, proc = fake_cgroup(tmp_path / "free", membership, {
        "memory/slurm/job_7/memory.limit_in_bytes": f"{V1_UNLIMITED}\n"})
    assert cgroup_memory_room(unlimited, proc) is None


def test_inside_a_container_the_root_cgroup_is_the_containers(tmp_path) -> None:
    root, proc = fake_cgroup(tmp_path, "0::/\n", {"memory.max": f"{16 * GIB}\n", "memory.current": f"{GIB}\n"})
    assert cgroup_memory_room(root, proc) == 15 * GIB
    assert cgroup_memory_room(tmp_path / "missing", tmp_path / "missing_proc") is None


def test_a_cgroup_limit_lowers_the_planners_host_memory(tmp_path, monkeypatch) -> None:
    available = psutil.virtual_memory().available
    limit = available // 4
    root, proc = fake_cgroup(tmp_path, "0::/job\n", {"job/memory.max": f"{limit}\n", "job/memory.current": "0\n"})
    monkeypatch.setattr(budget, "CGROUP_ROOT", root)
    monkeypatch.setattr(budget, "PROC_SELF_CGROUP", proc)
    machine = Machine.detect(torch.device("cpu"))
    assert machine.host_memory_gib == pytest.approx(limit / GIB)
    assert machine.host_limit == "the job's memory limit (cgroup)"
    assert "cgroup" in machine.describe()


def test_a_budget_only_ever_lowers_what_the_system_reports(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(budget, "PROC_SELF_CGROUP", tmp_path / "no_cgroup")
    above = host_memory_available(max_host_memory_gib=10 * psutil.virtual_memory().total / GIB)
    assert above.limit is None and above.bytes <= psutil.virtual_memory().total
    held = GIB // 8
    monkeypatch.setattr(budget, "_rss", lambda: held)
    below = host_memory_available(max_host_memory_gib=0.5)
    # The budget is all the process may hold: what it holds already is not room.
    assert below.bytes == GIB // 2 - held and below.limit == "the budget `max_host_memory_gib=0.5`"


def test_budgets_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"`max_host_memory_gib=0` must be a positive number"):
        SingleGPUOffloadStrategy(max_host_memory_gib=0)
    with pytest.raises(ValueError, match=r"`max_gpu_memory_gib='24'` must be a positive number"):
        SingleGPUOffloadStrategy(max_gpu_memory_gib="24")


def test_an_explicit_host_budget_changes_the_plan_and_a_refusal_names_it(monkeypatch) -> None:
    monkeypatch.setattr(budget, "_rss", lambda: 0)  # the whole budget is room: the test's arithmetic is exact
    _, roomy = fit(SingleGPUOffloadStrategy(), num_batches=1)
    report = roomy.strategy.plan_report
    chosen = report.chosen
    total = {c.plan: (c.memory.gpu_bytes + c.memory.host_bytes) / GIB for c in report.candidates}
    leaner = min(total.values())
    assert total[chosen.plan] > leaner  # the fastest plan is not the leanest: a budget between them changes it
    between = (total[chosen.plan] + leaner) / 2 / 0.9
    _, budgeted = fit(SingleGPUOffloadStrategy(max_host_memory_gib=between), num_batches=1)
    planned = budgeted.strategy.plan_report
    assert planned.machine.host_memory_gib == pytest.approx(between)
    assert planned.chosen.plan != chosen.plan and total[planned.chosen.plan] <= 0.9 * between
    with pytest.raises(PlanDoesNotFit, match=r"the budget `max_host_memory_gib=0\.5` limits the host RAM"):
        fit(SingleGPUOffloadStrategy(max_host_memory_gib=0.5), num_batches=1)


def test_a_gpu_budget_is_named_in_the_table_and_the_refusal() -> None:
    machine = Machine(gpu_memory_gib=20, host_memory_gib=125, gpu_limit="the budget `max_gpu_memory_gib=20`")
    report = plan(LLAMA_8B, machine=machine, ceilings=Ceilings(), backend="device")
    assert "20 GiB GPU (held there by the budget `max_gpu_memory_gib=20`)" in report.table()
    assert "the budget `max_gpu_memory_gib=20` limits the GPU" in str(report.error())


def test_a_refusal_under_clipping_names_clipping_when_the_unclipped_plan_fits() -> None:
    gpu_8bit = Plan(backend="gpu_8bit", optimizer="adamw8bit_fused", checkpointing="full")
    clipped, unclipped = (estimate_memory(LLAMA_8B, gpu_8bit, holds_gradients=holds).gpu_bytes / GIB / 0.9
                          for holds in (True, False))
    machine = Machine(gpu_memory_gib=(clipped + unclipped) / 2, host_memory_gib=125)
    report = plan(LLAMA_8B, machine=machine, ceilings=Ceilings(), backend="gpu_8bit",
                  activation_checkpointing="full", needs=RunNeeds(gradient_clip_val=1.0))
    assert report.chosen is None
    message = str(report.error())
    assert "without gradient clipping by norm (`gradient_clip_val=None`" in message
    assert f"{gpu_8bit} fits" in message
    assert plan(LLAMA_8B, machine=machine, ceilings=Ceilings(), backend="gpu_8bit",
                activation_checkpointing="full").chosen


def test_the_former_lever_name_warns_and_pins_the_same_policy() -> None:
    machine = Machine(gpu_memory_gib=80, host_memory_gib=125)
    with pytest.warns(FutureWarning, match="pass `activation_checkpointing=`"):
        former = plan(LLAMA_8B, machine=machine, ceilings=Ceilings(), checkpointing="none")
    current = plan(LLAMA_8B, machine=machine, ceilings=Ceilings(), activation_checkpointing="none")
    assert [c.plan for c in former.candidates] == [c.plan for c in current.candidates]
    assert {c.plan.checkpointing for c in current.candidates} == {"none"}


# torch < 2.8 has no getter for the fraction, so the planner cannot see one set by the user there.
needs_fraction_getter = pytest.mark.skipif(not hasattr(torch.cuda, "get_per_process_memory_fraction"),
                                           reason="torch.cuda.get_per_process_memory_fraction is torch >= 2.8")


@pytest.mark.gpu
@needs_fraction_getter
def test_the_allocators_per_process_fraction_lowers_the_planners_gpu_memory() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    _, total = torch.cuda.mem_get_info(device)
    torch.cuda.set_per_process_memory_fraction(0.25, device)
    try:
        machine = Machine.detect(device)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    assert machine.gpu_memory_gib == pytest.approx(0.25 * total / GIB)
    assert "set_per_process_memory_fraction(0.25)" in machine.gpu_limit


@pytest.mark.gpu
@needs_fraction_getter
def test_a_gpu_budget_caps_the_allocator_during_the_fit_and_the_peak_keeps_to_it() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    budget_gib = 4.0
    seen = {}

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            seen["fraction"] = torch.cuda.get_per_process_memory_fraction(device)

    torch.cuda.reset_peak_memory_stats(device)
    _, trainer = fit(SingleGPUOffloadStrategy(max_gpu_memory_gib=budget_gib), num_batches=2, accelerator="gpu",
                     precision="bf16-mixed", callbacks=[Watch()])
    _, total = torch.cuda.mem_get_info(device)
    assert trainer.strategy.plan_report.machine.gpu_memory_gib == pytest.approx(budget_gib)
    assert seen["fraction"] * total <= budget_gib * GIB
    assert torch.cuda.max_memory_reserved(device) <= budget_gib * GIB
    assert torch.cuda.get_per_process_memory_fraction(device) == 1.0  # given back at teardown


def test_a_bare_cuda_device_reads_the_current_devices_allocator_fraction(monkeypatch) -> None:
    """torch's fraction getter refuses `torch.device("cuda")` without an index; the plan command plans for that."""
    from lightning_offload.planner import budget

    asked = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction",
                        lambda device: asked.append(device) or 0.5, raising=False)
    assert budget._allocator_fraction(torch.device("cuda")) == 0.5
    assert asked == [torch.device("cuda", 3)]
