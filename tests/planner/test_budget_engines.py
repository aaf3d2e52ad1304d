"""The host budget reaches the engines: each sizes its host allocations within it and refuses, before allocating,
what it cannot hold; during training the run warns once when it comes within 5% of a limit."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_offload import SingleGPUOffloadStrategy
from lightning_offload.activation_checkpointing import CheckpointingConfig, activation_offloader
from lightning_offload.planner import GIB
from lightning_offload.planner import budget
from lightning_offload.planner.budget import HOST_WARNING_FRACTION, Available, HostBudget, refuse_beyond_host_room
from tests.conftest import TinyLM, fit
from tests.planner.test_budget import fake_cgroup

# Streams every unit that can stream, so the host arenas hold weights as well as 8-bit state.
ALL_STREAMED = dict(resident_blocks=0, stream_outer=True, build_on_meta=False, host_reserve_gib=0.0)
OFFLOAD_EVERYTHING = CheckpointingConfig(policy="offload", offload_min_bytes=0)


@pytest.fixture
def steady_rss(monkeypatch) -> dict[str, int]:
    """The process's RSS as the budget reads it, held where the test puts it (from 0: the budget is then all room;
    a real one moves by megabytes with whatever else the interpreter allocates, more than a tiny model's arenas);
    no cgroup limit."""
    rss = {"bytes": 0}
    monkeypatch.setattr(budget, "_rss", lambda: rss["bytes"])
    monkeypatch.setattr(budget, "PROC_SELF_CGROUP", budget.PROC_SELF_CGROUP.with_name("no_such_cgroup_file"))
    return rss


def parameter_count() -> int:
    module = TinyLM()
    module.configure_model()
    return sum(p.numel() for p in module.parameters())


def test_a_refusal_names_what_limits_the_room_and_the_fix_for_each_limit() -> None:
    needed, room = 3 * GIB, 2 * GIB
    for limit, lift in (("the budget `max_host_memory_gib=2`", "raise `max_host_memory_gib`"),
                        ("the job's memory limit (cgroup)", "SLURM `--mem`"), (None, "free host memory")):
        with pytest.raises(MemoryError) as refused:
            refuse_beyond_host_room(needed, Available(room, limit), what="The arena", fix="Shrink it.")
        message = str(refused.value)
        assert "The arena needs 3.0 GiB of host memory, 1.0 GiB more than the 2.0 GiB" in message
        assert (limit or "held there") in message if limit else "held there" not in message
        assert "Shrink it." in message and lift in message
    refuse_beyond_host_room(room, Available(room, "the budget"), what="The arena", fix="")


def test_the_budgets_room_is_what_the_process_does_not_hold_yet(steady_rss) -> None:
    run = HostBudget(max_host_memory_gib=4)
    assert run.room().bytes == 4 * GIB and run.room().limit == "the budget `max_host_memory_gib=4`"
    steady_rss["bytes"] += 3 * GIB
    assert run.room().bytes == GIB
    assert HostBudget().room().limit is None  # no budget: what the system has


def test_the_run_warns_once_within_5_percent_of_its_budget(steady_rss) -> None:
    run = HostBudget(max_host_memory_gib=10)
    steady_rss["bytes"] += int((HOST_WARNING_FRACTION - 0.01) * 10 * GIB)
    assert run.warning_once() is None
    steady_rss["bytes"] += int(0.02 * 10 * GIB)
    warning = run.warning_once()
    assert warning is not None and "within 5% of the budget `max_host_memory_gib=10`" in warning
    assert "raise `max_host_memory_gib`" in warning
    assert run.warning_once() is None  # once


def test_the_run_warns_within_5_percent_of_the_jobs_cgroup_limit(tmp_path, monkeypatch) -> None:
    limit = 64 * GIB
    for used, warns in ((int(0.9 * limit), False), (int(0.97 * limit), True)):
        root, proc = fake_cgroup(tmp_path / str(used), "0::/job\n", {"job/memory.max": f"{limit}\n",
                                                                    "job/memory.current": f"{used}\n"})
        monkeypatch.setattr(budget, "CGROUP_ROOT", root)
        monkeypatch.setattr(budget, "PROC_SELF_CGROUP", proc)
        warning = HostBudget().warning_once()
        assert (warning is not None) == warns
    assert "The job's memory limit (cgroup) is 97% used" in warning and "SLURM `--mem`" in warning


def test_a_fit_warns_once_as_host_memory_nears_its_budget(steady_rss, tmp_path) -> None:
    class Grow(TinyLM):
        def training_step(self, batch, batch_idx):
            steady_rss["bytes"] = int(0.99 * GIB)  # seen at the next look: the next epoch's first batch
            return super().training_step(batch, batch_idx)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, trainer = fit(SingleGPUOffloadStrategy(backend="device", check_memory=False, max_host_memory_gib=1),
                         module=Grow(), num_batches=2, max_epochs=2)
        trainer.save_checkpoint(tmp_path / "last.ckpt")
    near = [w for w in caught if "of the budget `max_host_memory_gib=1`" in str(w.message)]
    assert len(near) == 1


def test_stream_arenas_are_checked_against_the_budget_before_allocation(steady_rss) -> None:
    _, roomy = fit(SingleGPUOffloadStrategy(backend="stream", check_memory=False, max_host_memory_gib=1,
                                            **ALL_STREAMED), precision="bf16-true", num_batches=1)
    pinned = roomy.strategy.backend.placement.host_pinned_bytes
    arenas = sum(arena.buffer.numel() for arena in roomy.strategy.backend._arenas)
    assert arenas >= pinned > 0  # what the check counts is what the arenas hold (each rounded up to its alignment)
    just_over = (arenas + 1) / GIB
    fit(SingleGPUOffloadStrategy(backend="stream", check_memory=False, max_host_memory_gib=just_over,
                                 **ALL_STREAMED), precision="bf16-true", num_batches=1)
    module = TinyLM()
    with pytest.raises(MemoryError, match=r"pinned host memory .* \(held there by the budget "
                                          r"`max_host_memory_gib=[0-9.e-]+`\).* raise `max_host_memory_gib`"):
        fit(SingleGPUOffloadStrategy(backend="stream", check_memory=False, max_host_memory_gib=pinned / 2 / GIB,
                                     **ALL_STREAMED), module=module, precision="bf16-true", num_batches=1)
    assert module.losses == []  # refused before a step


def test_host_adam_refuses_optimizer_state_beyond_the_budget_before_allocating(steady_rss) -> None:
    state = 12 * parameter_count()  # fp32 master weights and both AdamW moments
    small = dict(bucket_numel=3000, chunk_numel=700, grad_slots=2)
    buffers = (small["grad_slots"] * small["bucket_numel"] + 8 * small["chunk_numel"]) * 4
    _, trainer = fit(SingleGPUOffloadStrategy(backend="host_adam", check_memory=False,
                                              max_host_memory_gib=(state + buffers) / GIB, **small), num_batches=1)
    engine = trainer.strategy.backend.engine
    assert engine.arena.numel() * engine.arena.element_size() == state
    module = TinyLM()
    with pytest.raises(MemoryError, match=r"`host_adam` backend's optimizer state .* held there by the budget "
                                          r"`max_host_memory_gib=.*`gpu_state_blocks`"):
        fit(SingleGPUOffloadStrategy(backend="host_adam", check_memory=False,
                                     max_host_memory_gib=(state + buffers - 1) / GIB, **small),
            module=module, num_batches=1)
    assert module.losses == []


def test_deepspeed_refuses_offloaded_optimizer_state_beyond_the_budget(steady_rss) -> None:
    state = 16 * parameter_count()  # fp32 master weights, gradients and Adam moments
    module = TinyLM()
    with pytest.raises(MemoryError, match=r"`deepspeed` backend's optimizer state .* held there by the budget "
                                          r"`max_host_memory_gib=.*`offload_device='nvme'`"):
        fit(SingleGPUOffloadStrategy(backend="deepspeed", check_memory=False, max_host_memory_gib=state / 2 / GIB),
            module=module, num_batches=1)
    assert module.losses == []


def test_the_activation_pool_grows_only_within_the_budget(steady_rss) -> None:
    module, _ = fit(SingleGPUOffloadStrategy(backend="device", activation_checkpointing=OFFLOAD_EVERYTHING,
                                             check_memory=False, max_host_memory_gib=1), num_batches=2)
    peak = activation_offloader(module).pool.high_water_bytes
    assert peak > 0
    fit(SingleGPUOffloadStrategy(backend="device", activation_checkpointing=OFFLOAD_EVERYTHING, check_memory=False,
                                 max_host_memory_gib=peak / GIB), num_batches=2)
    module = TinyLM()
    with pytest.raises(MemoryError, match=r"Offloading activations .* held there by the budget "
                                          r"`max_host_memory_gib=.*activation_checkpointing='full'"):
        fit(SingleGPUOffloadStrategy(backend="device", activation_checkpointing=OFFLOAD_EVERYTHING,
                                     check_memory=False, max_host_memory_gib=peak / 2 / GIB),
            module=module, num_batches=2)
    assert module.losses == []


def test_deepspeed_keeps_nvme_parameters_in_host_memory_only_within_the_budget(steady_rss, tmp_path) -> None:
    from lightning_offload.backends.deepspeed import DeepSpeedBackend, DeepSpeedConfig
    from lightning_offload.backends.deepspeed import NVME_PARAMS_IN_HOST

    module = TinyLM()
    module.configure_model()
    state = 16 * parameter_count()  # this process's optimizer state, kept in host memory beside them
    backend = DeepSpeedBackend(DeepSpeedConfig(offload_device="nvme", nvme_path=str(tmp_path),
                                               nvme_state="parameters"))
    kept = {}
    for spare in (GIB // 2, GIB):
        backend.host_budget = HostBudget((state + spare) / GIB)
        kept[spare] = backend.params_in_host_within_budget(module)
    assert kept == pytest.approx({GIB // 2: GIB // 4, GIB: GIB // 2}, abs=1)  # bf16: 2 bytes per parameter
    backend.host_budget = HostBudget(state / GIB)
    assert backend.params_in_host_within_budget(module) == pytest.approx(0, abs=1)
    backend.host_budget = None  # no budget: DeepSpeed's default where the machine has the room
    assert backend.params_in_host_within_budget(module) <= NVME_PARAMS_IN_HOST
