"""`offload`: `single_gpu_offload` across processes - several devices of one machine, or several machines.

The same backends, optimizers and checkpointing policies, sharded by the engines themselves: DeepSpeed ZeRO-3
partitions parameters, gradients and optimizer state across ranks (each rank's share offloaded to its host), FSDP2
shards each block across ranks (each shard offloaded), and optimizers that step local shards (8-bit ones) step each
rank's own. Processes are started the way Lightning starts them for DDP: its launcher re-runs the script once per
extra device, and `torchrun` or SLURM (through Lightning's cluster environments) start them externally. With one
device this is `single_gpu_offload`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.distributed import _all_gather_ddp_if_available, _sync_ddp_if_available
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import ParallelStrategy
from lightning_utilities.core.rank_zero import rank_zero_only
from typing_extensions import override

from lightning_offload._distributed import join_process_group, refuse_running_group
from lightning_offload.backends import available_backends, registry
from lightning_offload.activation_checkpointing import as_checkpointing_config
from lightning_offload.planner import Plan, PlanDoesNotFit
from lightning_offload.planner.fallback import BuildBeforePlanning
from lightning_offload.planner.lightning import checkpointing_of, plan_for_trainer
from lightning_offload.planner.record import fit_ckpt_path, resume_report, saved_plan
from lightning_offload.strategy import MULTI_DEVICE_NAME, _SingleGPUOffloadCore
from lightning_offload.telemetry import ThroughputMonitor


class _OffloadCore(_SingleGPUOffloadCore):
    """`single_gpu_offload` on any number of devices and nodes (`Trainer(devices=N, num_nodes=M)`).

    Args:
        process_group_timeout: how long a collective waits for the other ranks before failing.
        Every other argument is `SingleGPUOffloadStrategy`'s.
    """

    strategy_name = MULTI_DEVICE_NAME

    def __init__(self, backend: str = "auto", *, process_group_timeout: timedelta | None = default_pg_timeout,
                 **options: Any) -> None:
        super().__init__(backend, **options)
        self.process_group_timeout = process_group_timeout

    @property
    @override
    def root_device(self) -> torch.device:
        return self.parallel_devices[self.local_rank] if self.parallel_devices else torch.device("cpu")

    @property
    def num_processes(self) -> int:
        """Processes on this node: one per device."""
        return len(self.parallel_devices) if self.parallel_devices else 1

    @property
    def is_distributed(self) -> bool:
        # Read by the Trainer to decide on a `DistributedSampler`.
        return self.world_size > 1

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.num_nodes * self.num_processes, "rank": self.global_rank}

    @override
    def _configure_launcher(self) -> None:
        environment = self.cluster_environment
        if self.num_nodes * self.num_processes > 1 and not environment.creates_processes_externally:
            launcher = self._lightning_attr("strategies.launchers", "_SubprocessScriptLauncher")
            self._launcher = launcher(environment, self.num_processes, self.num_nodes)

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = self.global_rank

    @override
    def _setup_processes(self) -> None:
        if self.world_size == 1:
            refuse_running_group(1, self.strategy_name)
            return
        if self.backend_name is not None and registry.spec(self.backend_name).multi_process is None:
            across = " or ".join(f"`backend={name!r}`" for name in registry.multi_process_backends()
                                 if registry.spec(name).multi_process.shards_state)
            raise ValueError(
                f"`{self.strategy_name}` with `backend={self.backend_name!r}` trains on one device, but this run has "
                f"{self.world_size} processes. Across processes use {across}, or train with `devices=1`."
            )
        refuse_running_group(self.world_size, self.strategy_name)
        # Processes started by the launcher re-seed from the seed the main process set (as Lightning's DDP does).
        reset_seed()
        self.set_world_ranks()
        join_process_group(self.cluster_environment, self.root_device, self.process_group_timeout)

    @override
    def _plan_and_setup_backend(self) -> None:
        if self.world_size == 1:
            super()._plan_and_setup_backend()
            return
        if self._fit.backend_ready:
            return
        chosen = self._plan_on_rank_zero() if self.check_memory or self.backend is None else None
        if self.backend is None:
            if chosen is None:
                fallback = registry.spec(registry.UNMEASURED_MULTI_PROCESS)
                self._lightning_attr("utilities.rank_zero", "rank_zero_info")(
                    f"`backend='auto'` across {self.world_size} processes without a plan: {fallback.name!r}."
                )
                chosen = Plan(backend=fallback.name, optimizer=fallback.exact_optimizer, checkpointing="full")
            self._adopt_plan(chosen)
        else:
            if chosen is not None:  # saved in each checkpoint, for a resume under `backend="auto"`
                self.plan = chosen
            if self.activation_checkpointing.left_to_the_planner:
                self.activation_checkpointing = checkpointing_of(chosen) if chosen else as_checkpointing_config("full")
        self._setup_backend_environment()

    def _plan_on_rank_zero(self) -> Plan | None:
        """Rank 0 plans per rank (memory per GPU, and per host with this node's ranks sharing its RAM) and every
        rank takes its decision, so all build the same engine; a refusal is raised on every rank alike."""
        if self._memory_checked:
            return None
        self._memory_checked = True
        outcome: tuple[Plan | None, str | None] = (None, None)
        if self.global_rank == 0:
            # Every rank resumes with the checkpoint's plan: another backend could not read what it wrote.
            resume_from = fit_ckpt_path(self.lightning_module.trainer) if self.backend is None else None
            saved = saved_plan(resume_from) if resume_from else None
            try:
                report = plan_for_trainer(self.lightning_module, self.lightning_module.trainer, self.root_device,
                                          backend=self.backend_name, optimizer=self.optimizer_name,
                                          checkpointing=self.activation_checkpointing,
                                          precision=self._precision_flag, world_size=self.world_size,
                                          ranks_per_host=self.num_processes, compiled_blocks=self.compile_blocks,
                                          max_gpu_memory_gib=self.max_gpu_memory_gib,
                                          max_host_memory_gib=self.max_host_memory_gib)
                if report is not None and saved is not None:
                    report = resume_report(report, saved, resume_from)
            except BuildBeforePlanning as unbuildable:  # every rank builds its shard under the engine: no plan
                self._lightning_attr("utilities.rank_zero", "rank_zero_warn")(
                    f"{unbuildable.reason}: no memory check ran across {self.world_size} processes."
                )
                report, outcome = None, (saved, None)
            except PlanDoesNotFit as refusal:  # unfit to build, or the checkpoint's plan no longer fits: every rank
                report, outcome = None, (None, str(refusal))
            if report is not None:
                self.plan_report = report
                self._lightning_attr("utilities.rank_zero", "rank_zero_info")(report.table())
                outcome = (report.chosen.plan, None) if report.chosen else (None, str(report.error()))
        chosen, refusal = self.broadcast(outcome, 0)
        if refusal is not None:
            raise PlanDoesNotFit(refusal)
        return chosen

    @override
    def barrier(self, name: str | None = None) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if self.world_size == 1:
            return obj
        objects = [obj]
        torch.distributed.broadcast_object_list(objects, src)
        return objects[0]

    @override
    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any | None = "mean") -> Any:
        if self.world_size == 1 or not isinstance(tensor, torch.Tensor):
            return tensor
        return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)

    @override
    def all_gather(self, tensor: torch.Tensor, group: Any | None = None, sync_grads: bool = False) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        return _all_gather_ddp_if_available(tensor, group=group, sync_grads=sync_grads)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            MULTI_DEVICE_NAME, cls, description="Offloaded training on any number of devices and nodes "
            "(lightning_offload)", override=True,
        )
        for name in available_backends():
            strategy_registry.register(
                f"{MULTI_DEVICE_NAME}_{name}", cls, description=f"`{MULTI_DEVICE_NAME}` on the {name!r} backend",
                override=True, backend=name,
            )


class OffloadStrategy(_OffloadCore, ParallelStrategy):
    __doc__ = _OffloadCore.__doc__
    _lightning = "lightning.pytorch"
    _telemetry_callback = ThroughputMonitor
