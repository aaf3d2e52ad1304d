"""`single_gpu_offload`: the Lightning face of lightning_offload.

The strategy does what Lightning asks of a strategy and hands the engine work to a `Backend`. Lightning ships two
namespaces (`lightning.pytorch` and `pytorch_lightning`) whose Trainers each accept only their own `Strategy`
subclasses, so the behaviour lives in `_SingleGPUOffloadCore` and each namespace gets a two-line class on top.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import warnings
from collections.abc import Callable, Generator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from importlib import import_module
from pathlib import Path
from typing import Any, ClassVar

import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from typing_extensions import override

from lightning_offload._distributed import refuse_running_group
from lightning_offload.backends import available_backends, backend_class, registry
from lightning_offload.backends.base import Backend, TrainingSetup, release_other_engines
from lightning_offload.backends.needs import RunNeeds
from lightning_offload.activation_checkpointing import (
    CheckpointingConfig,
    activation_offloader,
    as_checkpointing_config,
    remove_fit_checkpointing,
)
from lightning_offload.compile import compile_blocks
from lightning_offload.consolidation import (
    WEIGHTS_LOCATION_KEY,
    checkpoint_writer,
    file_backends,
    lightning_checkpoint,
    weights_location,
)
from lightning_offload.planner import Plan, PlanDoesNotFit, PlanReport, native_bf16
from lightning_offload.planner.budget import HostBudget, cap_gpu_allocator
from lightning_offload.planner.fallback import BuildBeforePlanning
from lightning_offload.planner.lightning import (
    check_checkpoint_disk,
    checkpointing_of,
    optimizer_of,
    plan_for_trainer,
    run_needs,
)
from lightning_offload.planner.preflight import user_program_preserved
from lightning_offload.planner.refit import batch_elements, refuse_what_the_kept_plan_cannot_fit
from lightning_offload.planner.record import (
    PLAN_KEY,
    fit_ckpt_path,
    plan_hyperparameters,
    plan_state,
    resume_report,
    same_checkpoint_format,
    saved_plan,
)
from lightning_offload.optim import (
    check_optimizer_device,
    check_optimizer_name,
    rebind_lr_schedulers,
    replace_optimizer,
)
from lightning_offload.saving import (
    WeightsOnlyCheckpointError,
    damage_reported,
    holds_weights_only,
    remove_checkpoint,
    save_with_checkpoint_io,
    weights_only_refusal,
)
from lightning_offload.step_signals import SignalsHeldInSteps
from lightning_offload.telemetry import ThroughputMonitor, _ThroughputMonitorCore

STRATEGY_NAME = "single_gpu_offload"
# The same strategy across processes: several devices of one machine, or several machines (`parallel.py`).
MULTI_DEVICE_NAME = "offload"
# Lightning callbacks that read every parameter after each optimizer step (subclasses included).
WEIGHT_AVERAGING_CALLBACKS = ("WeightAveraging", "StochasticWeightAveraging")
# Host memory is looked at every this many batches (each epoch's first included) and at each checkpoint.
HOST_WATCH_EVERY_BATCHES = 50


@dataclass
class _FitSetup:
    """What one fit (or validate, test, predict) has set up: made at `setup_environment`, dropped at `teardown`."""

    backend_ready: bool = False
    """The plan is adopted and the backend's environment (precision, allocator cap, engine) is set up."""
    building_unplanned: bool = False
    """The meta device could not build the model: `configure_model` builds it in host memory, and the plan is made
    from the built model at `setup`."""
    fetched_example: tuple[Any, Any] | None = None
    """The batch (on meta) and step fetched before that build, measured with once the model is built."""
    uncapped_gpu_fraction: float | None = None
    """The allocator's fraction before `max_gpu_memory_gib` capped it, restored at `teardown`."""
    signals_held_in_steps: SignalsHeldInSteps | None = None
    """Ctrl+C and the requeue signal, held until the step ends while the engine updates inside backward."""
    first_batch_pending: bool = False
    """This run's first batch is yet to come: the planned run's (a fit's first training batch, or the first batch of
    the validate, test or predict that planned) is the size its plan was made for, a later fit's is priced against
    it (`batch_to_device`)."""


class _SingleGPUOffloadCore:
    """Trains one LightningModule on one device with parameters and optimizer state wherever the backend keeps them.

    At setup, before the model is built, the memory planner (``lightning_offload.planner``) measures the model on the
    meta device at the first training batch's shape and estimates every candidate plan's memory and step time on
    this machine: ``backend="auto"`` takes the fastest plan that fits, a pinned backend is checked the same way, and
    a run that cannot fit is refused with the shortfall per memory tier before anything large is allocated. The plan
    is logged with the hyperparameters and saved in each checkpoint; ``fit(ckpt_path=...)`` with ``backend="auto"``
    resumes with the checkpoint's plan.

    Args:
        backend: the engine: ``"auto"`` (default: the planner chooses) or one of
            ``lightning_offload.backends.available_backends()``.
        optimizer: ``None`` keeps the optimizer from ``configure_optimizers`` (the planner falls back to 8-bit
            state only when no plan with it fits, and says so); a name from ``lightning_offload.optim.OPTIMIZERS``
            (e.g. ``"adamw8bit"``) swaps its implementation and keeps its param groups and hyperparameters.
        activation_checkpointing: ``None`` (default: the planner chooses), a policy name from
            ``lightning_offload.activation_checkpointing.POLICIES``, or a dict of ``CheckpointingConfig`` fields.
        check_memory: ``False`` skips the planner's pre-flight check of a pinned backend (the planner still runs
            for ``backend="auto"``).
        telemetry: add a `lightning_offload.telemetry.ThroughputMonitor` to each fit whose Trainer has none
            (tokens/s, MFU and memory per step, to the loggers and the progress bar); ``False`` leaves it out.
        compile_blocks: compile each repeated block's forward with ``torch.compile`` (``lightning_offload.compile``):
            faster steps for large models, for seconds of compiling at the first step (bench/RESULTS.md,
            "Compiled blocks").
        max_gpu_memory_gib: at most this much GPU memory for the run (the card is shared, or kept partly free): the
            planner plans within it and the CUDA allocator is capped at it. ``None``: what is free on the GPU.
        max_host_memory_gib: at most this much host RAM for the process (what it holds already included): the
            planner plans within it, the engines size their host buffers within it and refuse beyond it, and the run
            warns once when it comes within 5%. ``None``: what is available, within the job's cgroup memory limit
            (SLURM ``--mem``, a container's limit), which is always honoured the same way.
        **backend_options: the pinned backend's knobs, e.g. ``offload_optimizer=False`` for the ``deepspeed`` backend
            (see its ``Config`` dataclass for every option and its trade-off). Under ``backend="auto"`` only the
            options that change no plan (``Backend.options_under_auto``, e.g. ``initial_weights="on_device"`` for
            ``stream``), applied when the planner picks their backend.
    """

    # The Lightning namespace this class serves: "lightning.pytorch" or "pytorch_lightning".
    _lightning: ClassVar[str]
    # The namespace's telemetry callback class.
    _telemetry_callback: ClassVar[type]
    # The registered name, for messages.
    strategy_name: ClassVar[str] = STRATEGY_NAME

    def __init__(self, backend: str = "auto", *, optimizer: str | None = None,
                 activation_checkpointing: str | dict[str, Any] | CheckpointingConfig | None = None,
                 check_memory: bool = True, telemetry: bool = True, compile_blocks: bool = False,
                 max_gpu_memory_gib: float | None = None, max_host_memory_gib: float | None = None,
                 accelerator: Any = None,
                 checkpoint_io: Any = None,
                 precision_plugin: Any = None, **backend_options: Any) -> None:
        super().__init__(accelerator=accelerator, checkpoint_io=checkpoint_io, precision_plugin=precision_plugin)
        if backend not in ("auto", *available_backends()):
            raise ValueError(
                f"`SingleGPUOffloadStrategy(backend={backend!r})` is unknown. "
                f"Choose one of {['auto', *available_backends()]}."
            )
        if backend == "auto" and backend_options:
            _check_options_under_auto(backend_options)
        self._options_under_auto = backend_options if backend == "auto" else {}
        for name, budget in (("max_gpu_memory_gib", max_gpu_memory_gib), ("max_host_memory_gib", max_host_memory_gib)):
            if budget is not None and not (isinstance(budget, (int, float)) and budget > 0):
                raise ValueError(f"`{name}={budget!r}` must be a positive number of GiB, or None for no budget.")
        self.max_gpu_memory_gib = max_gpu_memory_gib
        self.max_host_memory_gib = max_host_memory_gib
        self._host_budget: HostBudget | None = None
        self.backend_name: str | None = None if backend == "auto" else backend
        self._backend_pinned = backend != "auto"
        self.backend: Backend | None = None
        if self.backend_name is not None:
            engine = backend_class(self.backend_name)
            self.backend = engine(engine.Config.from_options(backend_options))
        self.check_memory = check_memory
        self.plan_report: PlanReport | None = None
        # The plan this fit trains with: logged, saved in each checkpoint, taken again on resume.
        self.plan: Plan | None = None
        # Whether this strategy has planned (its first fit did): later fits reuse the engine that plan built.
        self._memory_checked = False
        # The size of the first fit's first training batch (`refit.batch_elements`): later fits' are priced by it.
        self._planned_batch_elements: int | None = None
        self._took_off_earlier_wrappers = False
        self._fit = _FitSetup()
        # A step's updates inside backward have begun and its optimizer step has not returned (it may never: Ctrl+C).
        self._inside_update = False
        check_optimizer_name(optimizer)
        self.optimizer_name = optimizer
        self._precision_flag = "32-true"
        self._engine_precision_plugin: Any = None
        self.activation_checkpointing = as_checkpointing_config(activation_checkpointing)
        self.telemetry = telemetry
        self.compile_blocks = compile_blocks
        # Filled in by the Trainer's connector from `accelerator=` / `devices=` / `num_nodes=`.
        self.parallel_devices: list[torch.device] | None = None
        self.num_nodes = 1

    def _lightning_attr(self, module: str, name: str) -> Any:
        return getattr(import_module(f"{self._lightning}.{module}"), name)

    @property
    @override
    def root_device(self) -> torch.device:
        return self.parallel_devices[0] if self.parallel_devices else torch.device("cpu")

    @override
    def setup_environment(self) -> None:
        prefer_expandable_segments(self.root_device)
        super().setup_environment()
        self._setup_processes()
        # The Trainer's plugin is read once: after it is swapped for the engine's, a second `fit` or a `validate`
        # on the same Trainer must not read the precision back from the engine's plugin.
        if self.precision_plugin is not self._engine_precision_plugin:
            self._precision_flag = self._requested_precision()
            refuse_emulated_bf16(self._precision_flag, self.root_device)
        self._fit = _FitSetup()
        if self._memory_checked and self.backend is not None:
            # Before the callbacks' `setup` (weight averaging copies the model there).
            self._refuse_what_the_kept_engine_cannot_run()
        if self.backend is not None:
            self._refuse_checkpoint_it_cannot_resume(self._resumed_checkpoint())
        if self.backend is not None and not self.check_memory:
            self._setup_backend_environment()

    def _setup_backend_environment(self) -> None:
        assert self.backend is not None
        self._fit.backend_ready = True
        if self.precision_plugin is not self._engine_precision_plugin:
            plugins = import_module(f"{self._lightning}.plugins.precision")
            self.precision_plugin = self.backend.precision_plugin(plugins, self._precision_flag, self.precision_plugin)
            self._engine_precision_plugin = self.precision_plugin
        self.backend.set_precision(self._precision_flag)
        check_optimizer_device(
            self.optimizer_name, self.backend.optimizer_state_device(self.root_device), self.root_device
        )
        if self.max_gpu_memory_gib is not None and self._fit.uncapped_gpu_fraction is None:
            # Before the engine sizes anything from the GPU's free memory.
            self._fit.uncapped_gpu_fraction = cap_gpu_allocator(self.root_device, self.max_gpu_memory_gib)
        # Engines size and check their host allocations within the same budget the planner planned with.
        self._host_budget = HostBudget(self.max_host_memory_gib)
        self.backend.host_budget = self._host_budget
        self.backend.setup_environment(self.root_device)
        if getattr(self, "world_size", 1) == 1:
            # The engine's one-process group makes Lightning think metrics need syncing across ranks; there is one.
            warnings.filterwarnings("ignore", message=r".*`sync_dist=True`.*distributed setting")
        self._lightning_attr("utilities.rank_zero", "rank_zero_info")(
            f"`{self.strategy_name}` on {self.root_device}: {self.backend.describe()}"
        )

    def _setup_processes(self) -> None:
        devices = self.parallel_devices or []
        if len(devices) > 1 or self.num_nodes > 1:
            raise ValueError(
                f"`strategy={STRATEGY_NAME!r}` trains on one device, but the Trainer was given {len(devices)} devices "
                f"on {self.num_nodes} node(s). Pass `devices=1` (and `num_nodes=1`), or use "
                f"`strategy={MULTI_DEVICE_NAME!r}` (`lightning_offload.OffloadStrategy`, same options) to shard the "
                "model across several devices and nodes."
            )
        refuse_running_group(1, STRATEGY_NAME)

    def _plan_and_setup_backend(self) -> None:
        """Runs once per fit, before the model is built (or, for a model built in `__init__` or one the meta device
        cannot build, before it is moved)."""
        if not self._took_off_earlier_wrappers:
            # A new strategy on a module an earlier fit wrapped (a notebook, a sweep): that fit's checkpointing is
            # not the model's own, and this fit plans and applies its own settings.
            self._took_off_earlier_wrappers = True
            remove_fit_checkpointing(self.lightning_module)
        if self._fit.backend_ready:
            return
        if self._memory_checked:
            # A later fit of the same module: it is already built and wrapped by the engine the first fit planned.
            self._setup_backend_environment()
            return
        trainer = self.lightning_module.trainer
        # The checkpoint this run loads (any `ckpt_path`), and the one a fit resumes.
        checkpoint, resume_from = fit_ckpt_path(trainer), self._resumed_checkpoint()
        if self.backend is not None:
            self._refuse_what_the_backend_cannot_run(trainer, self.lightning_module)  # before anything is built
        # A pinned backend's options that are levers of its plans (state on the GPU, a disk) bound the planner.
        pinned_levers = {option: getattr(self.backend.config, option)
                         for option in registry.pinned_levers(self.backend_name)} if self.backend is not None else {}
        info = self._lightning_attr("utilities.rank_zero", "rank_zero_info")
        # `backend="auto"` resumes with the plan the checkpoint was written by: another backend could not read it.
        saved = saved_plan(checkpoint) if checkpoint and self.backend is None else None
        # A folder saved without a plan (its run skipped the planner) is resumed by the backend that wrote it.
        planned_backend = self.backend_name or (checkpoint_writer(resume_from) if resume_from and saved is None
                                                else None)
        fitting = self._fitting()
        try:
            # The user's run must not notice the pre-flight: its random numbers, data order and module stay as
            # they were.
            with user_program_preserved(self.lightning_module, trainer, self.root_device):
                report = plan_for_trainer(self.lightning_module, trainer, self.root_device, backend=planned_backend,
                                          optimizer=self.optimizer_name, checkpointing=self.activation_checkpointing,
                                          precision=self._precision_flag, pinned_levers=pinned_levers,
                                          compiled_blocks=self.compile_blocks, example=self._fit.fetched_example,
                                          max_gpu_memory_gib=self.max_gpu_memory_gib,
                                          max_host_memory_gib=self.max_host_memory_gib,
                                          # validate / test / predict under `backend="auto"` without a saved plan:
                                          # the planner's choice, as for a fit, not a backend that may not fit.
                                          evaluation=self.backend is None and saved is None)
        except BuildBeforePlanning as pending:
            info(pending.message)
            self._fit.building_unplanned, self._fit.fetched_example = True, pending.example
            return
        self._fit.building_unplanned, self._fit.fetched_example = False, None
        if report is None:
            if saved is not None:  # validate / test / predict; any backend reads any checkpoint's weights
                self._adopt_plan(saved)
        else:
            if saved is not None:
                report = resume_report(report, saved, resume_from)
            self.plan_report = report
            info(report.table())
            if report.chosen is None:
                raise report.error()
            if fitting:
                check_checkpoint_disk(trainer, report)
            self._adopt_plan(report.chosen.plan)
            self._refuse_checkpoint_it_cannot_resume(resume_from)
        if self.plan is not None:
            for logger in trainer.loggers:
                logger.log_hyperparams(plan_hyperparameters(self.plan, self.plan_report))
        # Only a plan adopted makes a later fit reuse it: a refused one is planned again when the user retries.
        self._memory_checked = True
        self._fit.first_batch_pending = self.plan is not None
        self._setup_backend_environment()

    def _run_needs(self, module: Any, trainer: Any) -> RunNeeds:
        """What this run of `module` with `trainer` asks of an engine (`planner.lightning.run_needs`)."""
        return dataclasses.replace(
            run_needs(module, trainer, compile_blocks=self.compile_blocks, precision=self._precision_flag),
            processes=getattr(self, "world_size", 1))

    def _fitting(self) -> bool:
        """Whether the Trainer runs `fit` (not validate, test or predict)."""
        trainer = self.lightning_module.trainer
        return trainer.state.fn == self._lightning_attr("trainer.states", "TrainerFn").FITTING

    def _resumed_checkpoint(self) -> str | Path | None:
        """The checkpoint `fit(ckpt_path=...)` resumes from; None when this run does not fit or starts fresh."""
        return fit_ckpt_path(self.lightning_module.trainer) if self._fitting() else None

    def _checkpoint_format(self) -> str | None:
        """What this backend writes: its own folder (by its name), or Lightning's file (None)."""
        return self.backend_name if self.backend.saves_own_state else None

    def _refuse_checkpoint_it_cannot_resume(self, checkpoint_path: str | Path | None) -> None:
        """Refuses, before anything is built, to resume a checkpoint written in a format this backend cannot resume:
        each engine resumes its own folder, the others Lightning's file."""
        if checkpoint_path is None:
            return
        writer = checkpoint_writer(checkpoint_path)
        if writer == self._checkpoint_format():
            return
        written = f"a folder of the `{writer}` backend" if writer else "Lightning's single file"
        resumes = f"`backend={writer!r}`" if writer else " or ".join(f"`backend={name!r}`" for name in file_backends())
        raise ValueError(
            f"`fit(ckpt_path={str(checkpoint_path)!r})` cannot resume: the checkpoint is {written}, and this fit "
            f"trains with the `{self.backend_name}` backend, which resumes only its own checkpoints. Resume with "
            f"{resumes}, or start a new fit from its weights: `model = MyModule.load_from_checkpoint(...)`, then "
            "`trainer.fit(model)` without `ckpt_path` (`validate`, `test` and `predict` read it under any backend)."
        )

    def _adopt_plan(self, plan: Plan) -> None:
        """Takes the levers the user left open from `plan`: the backend (or a pinned one's planned options), the
        checkpointing policy, and the optimizer (8-bit state when nothing with the module's own fits)."""
        self.plan = plan
        if self.backend is None:
            self.backend_name = plan.backend
            engine = backend_class(plan.backend)
            given = engine.options_given_under_auto(self._options_under_auto)
            self.backend = engine(engine.Config.from_options({**registry.spec(plan.backend).options_of(plan), **given}))
        else:
            self.backend.adopt_plan(plan)
        if self.activation_checkpointing.left_to_the_planner:
            self.activation_checkpointing = checkpointing_of(plan)
        if self.optimizer_name is None:
            self.optimizer_name = optimizer_of(plan)

    def _requested_precision(self) -> str:
        plugin = self.precision_plugin
        precision = getattr(plugin, "precision", "32-true")
        plain = self._lightning_attr("plugins.precision", "Precision")
        known = tuple(
            self._lightning_attr("plugins.precision", name)
            for name in ("MixedPrecision", "HalfPrecision", "DeepSpeedPrecision")
        )
        if type(plugin) is not plain and not isinstance(plugin, known):
            raise ValueError(
                f"`{self.strategy_name}` cannot train with `{type(plugin).__name__}` (precision {precision!r}, from "
                "`Trainer(precision=...)` or `plugins=`). Pass `precision='bf16-mixed'`, 'bf16-true', '16-mixed' or "
                "'32-true', and no precision plugin in `plugins=`."
            )
        return str(precision)

    @contextmanager
    @override
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        # Lightning enters this just before `configure_model`: the last moment to plan before the model exists.
        self._plan_and_setup_backend()
        # The engine places (and partitions) parameters itself; creating them on the device first would need the
        # whole model in GPU memory.
        with self.precision_plugin.tensor_init_context():
            yield

    @contextmanager
    @override
    def model_sharded_context(self) -> Generator[None, None, None]:
        # Built before a plan exists: in host memory, as a model built in `__init__` is, for the engine to place.
        with nullcontext() if self._fit.building_unplanned else self.backend.model_init_context():
            yield

    @override
    def setup(self, trainer: Any) -> None:
        assert self.accelerator is not None and self.lightning_module is not None
        self._inside_update = False
        self._plan_and_setup_backend()
        gradient_hooks = self._refuse_what_the_backend_cannot_run(trainer, self.lightning_module)
        self.accelerator.setup(trainer)
        module = self.precision_plugin.convert_module(self.lightning_module)
        _move_non_parameter_state(module, self.root_device)
        if self.compile_blocks:
            self._compile_blocks(module)
        self.activation_checkpointing.apply(module)
        offloader = activation_offloader(module)
        if offloader is not None:
            offloader.host_budget = self._host_budget
        release_other_engines(self.backend)
        module = self.backend.prepare_module(module)
        fitting = self._fitting()
        if fitting and not any(p.requires_grad for p in module.parameters()):
            raise ValueError(
                f"`{type(module).__name__}` has no trainable parameter (every `requires_grad` is False), so there is "
                "nothing to fit. Unfreeze the parameters to train (`p.requires_grad_(True)`), or call "
                "`trainer.validate` / `trainer.predict` instead."
            )
        if fitting:
            self._add_telemetry(trainer)
            init_optimizers = self._lightning_attr("core.optimizer", "_init_optimizers_and_lr_schedulers")
            optimizers, scheduler_configs = init_optimizers(module)
            if len(optimizers) != 1:
                raise ValueError(
                    f"`{self.strategy_name}` steps one optimizer, but `configure_optimizers` returned "
                    f"{len(optimizers)}. "
                    "Return one optimizer (with several param groups if parts of the model need other settings)."
                )
            _refuse_empty_param_groups(optimizers[0])
            chosen = replace_optimizer(optimizers[0], self.optimizer_name) if self.optimizer_name else optimizers[0]
            engine_optimizer = self.backend.prepare_optimizer(chosen)
            rebind_lr_schedulers([c.scheduler for c in scheduler_configs], optimizers[0], engine_optimizer)
            for config in scheduler_configs:
                # `LearningRateMonitor` names each lr by its scheduler's optimizer class: the user's, not the engine's.
                if config.name is None and engine_optimizer is not optimizers[0]:
                    config.name = f"lr-{type(optimizers[0]).__name__}"
            setup = TrainingSetup(
                precision=self._precision_flag,
                accumulate_grad_batches=trainer.accumulate_grad_batches,
                gradient_clip_val=trainer.gradient_clip_val,
                gradient_clip_algorithm=trainer.gradient_clip_algorithm,
                gradient_hooks=gradient_hooks,
                weights_read_after_step=any(name in WEIGHT_AVERAGING_CALLBACKS for callback in trainer.callbacks
                                            for name in (cls.__name__ for cls in type(callback).__mro__)),
            )
            self.model, optimizer = self.backend.setup_training(module, engine_optimizer, setup)
            self.optimizers = [optimizer]
            self.lr_scheduler_configs = scheduler_configs
            monitor = self._lightning_attr("callbacks", "LearningRateMonitor")
            _name_lrs_by_the_users_optimizer([c for c in trainer.callbacks if isinstance(c, monitor)], optimizer,
                                             optimizers[0])
        else:
            self.model = self.backend.setup_inference(module, self._precision_flag)
        self.setup_precision_plugin()

    def _refuse_what_the_backend_cannot_run(self, trainer: Any, module: torch.nn.Module) -> tuple[str, ...]:
        """Refuses what of the run the engine cannot run (`Backend.refusals`); returns the module and callbacks that
        override `on_before_optimizer_step`, by name."""
        assert self.backend is not None
        needs = self._run_needs(module, trainer)
        refusals = self.backend.refusals(needs)
        if refusals:
            raise ValueError(refusals[0][1])
        return tuple(f"`{owner}`" for owner in needs.gradient_hooks)

    def _refuse_what_the_kept_engine_cannot_run(self) -> None:
        """A later fit keeps the engine the first fit built, which holds the trained model: what this fit adds that
        the engine cannot run (a callback, clipping), or that its plan has no memory for, is refused before anything
        of it runs."""
        trainer = self.lightning_module.trainer
        needs = self._run_needs(self.lightning_module, trainer)
        refusals = self.backend.refusals(needs)
        if not refusals:
            if self._fitting() and self.plan is not None:
                self._refuse_on_every_rank(lambda report: refuse_what_the_kept_plan_cannot_fit(
                    report, self.plan, needs, trainer.accumulate_grad_batches))
                self._fit.first_batch_pending = True  # its batches' size is known when the first comes
            return
        if self._backend_pinned:
            raise ValueError(refusals[0][1])
        runs_it = [name for name in available_backends() if not backend_class(name).refusals(needs)]
        raise ValueError(
            f"This fit adds what backend {self.backend_name!r} cannot run ({refusals[0][0]}): `backend='auto'` "
            f"chose {self.backend_name!r} at this strategy's first fit, which did not use it, and later fits keep "
            "the engine that holds the trained model. Use it from the first fit (the planner then picks a backend "
            f"that runs it), or pin one that does ({', '.join(repr(name) for name in runs_it)})."
        )

    def _compile_blocks(self, module: torch.nn.Module) -> None:
        checkpointing = self.activation_checkpointing
        compile_blocks(module, () if checkpointing.policy == "selective" else checkpointing.module_classes)

    def _add_telemetry(self, trainer: Any) -> None:
        # Lightning offers strategies no hook to add callbacks; `setup` is the first call that receives the Trainer,
        # and it runs before `on_fit_start`. A monitor the user passed (or one from an earlier fit) is kept.
        if self.telemetry and not any(isinstance(c, _ThroughputMonitorCore) for c in trainer.callbacks):
            trainer.callbacks.insert(0, self._telemetry_callback())

    @override
    def model_to_device(self) -> None:
        """The backend places parameters when it builds its engine; see `_move_non_parameter_state`."""

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        # The engine saves partitioned weights itself; gathering them here would need the whole model in memory.
        if self.backend.saves_own_state:
            return {}
        assert self.lightning_module is not None
        return self.backend.model_state_dict(self.lightning_module)

    @override
    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if self.backend.saves_own_state:
            return {}
        assert self.lightning_module is not None
        return self.backend.optimizer_state_dict(self.lightning_module, getattr(optimizer, "_optimizer", optimizer))

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        assert self.backend is not None
        if self.backend.updates_inside_backward():
            assert self.lightning_module is not None
            # Lightning's SLURM auto-requeue saves a checkpoint from this signal's handler, wherever it lands.
            environment = self.lightning_module.trainer._accelerator_connector.cluster_environment
            requeue = (getattr(environment, "requeue_signal", None)
                       if getattr(environment, "auto_requeue", False) else None)
            self._fit.signals_held_in_steps = SignalsHeldInSteps(
                [signal.SIGINT, *([requeue] if requeue is not None else [])],
                why=f"since backend {self.backend.name!r} updates parameters during backward (a model stopped or "
                    "checkpointed inside the step would be half a step ahead of its step counter)")

    @override
    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        trainer = self.lightning_module.trainer
        # A validate, test or predict plans on its own first batch; a fit on its first training batch, not its sanity
        # check's.
        if self._fit.first_batch_pending and (trainer.training or not self._fitting()):
            # Before `on_train_batch_start` and the step: the planned run's batch is the size its plan was made for;
            # a later fit's, when larger, is priced.
            self._fit.first_batch_pending = False
            elements = batch_elements(batch)
            if self._planned_batch_elements is None:
                self._planned_batch_elements = elements
            elif 0 < self._planned_batch_elements < elements:
                needs = self._run_needs(self.lightning_module, trainer)
                self._refuse_on_every_rank(lambda report: refuse_what_the_kept_plan_cannot_fit(
                    report, self.plan, needs, trainer.accumulate_grad_batches,
                    (elements, self._planned_batch_elements)))
        return super().batch_to_device(batch, device, dataloader_idx)

    def _refuse_on_every_rank(self, check: Callable[[PlanReport], None]) -> None:
        """Runs `check` of the plan report where it is held (across processes, rank 0 alone) and raises its
        `PlanDoesNotFit` on every rank: a refusal on one rank alone would leave the others waiting for it."""
        refusal = None
        if self.plan_report is not None:
            try:
                check(self.plan_report)
            except PlanDoesNotFit as error:
                refusal = str(error)
        refusal = self.broadcast(refusal, 0)
        if refusal is not None:
            raise PlanDoesNotFit(refusal)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if batch_idx % HOST_WATCH_EVERY_BATCHES == 0:
            self._watch_host_memory()
        if self._fit.signals_held_in_steps is not None:
            self._fit.signals_held_in_steps.step_ended()
            self._fit.signals_held_in_steps.step_started()

    @override
    def on_validation_start(self) -> None:
        super().on_validation_start()
        if self._fit.signals_held_in_steps is not None:
            self._fit.signals_held_in_steps.step_ended()

    @override
    def on_train_end(self) -> None:
        super().on_train_end()
        if self._fit.signals_held_in_steps is not None:
            self._fit.signals_held_in_steps.step_ended()

    def _watch_host_memory(self) -> None:
        warning = self._host_budget.warning_once() if self._host_budget is not None else None
        if warning is not None:
            warnings.warn(warning, stacklevel=2)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        self._watch_host_memory()
        if self._inside_update:
            assert self.backend is not None
            warnings.warn(
                f"Saving {str(filepath)!r} from inside a training step (the fit stopped there, or a callback saves "
                f"mid-step): backend {self.backend.name!r} had updated some parameters of step "
                f"{checkpoint.get('global_step')} during backward and not others, so this checkpoint is partly a step "
                "ahead of its step counter. For an exact resume, resume from a checkpoint saved between steps.",
                stacklevel=2)
        if self.plan is not None:
            checkpoint = {**checkpoint, PLAN_KEY: plan_state(self.plan)}
        if not self.backend.saves_own_state:
            if self.is_global_zero:
                save_with_checkpoint_io(self.checkpoint_io, checkpoint, filepath, storage_options)
            return None
        if storage_options is not None:
            raise TypeError(f"`storage_options` is not supported by the {self.backend_name!r} backend.")
        lightning_state = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        # Where the run kept the weights: Lightning's file tags its storages so, and the folder then loads there too.
        lightning_state[WEIGHTS_LOCATION_KEY] = weights_location(self.root_device)
        # Lightning leaves the optimizer state out of a `weights_only=True` checkpoint.
        self.backend.save_checkpoint(Path(filepath), lightning_state,
                                     weights_only="optimizer_states" not in checkpoint)

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        # A backend's folder goes in one rename, so a kill mid-way never leaves part of it under its name.
        if self.is_global_zero and Path(str(filepath)).is_dir():
            remove_checkpoint(filepath)
        else:
            super().remove_checkpoint(filepath)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        fitting = self._fitting()
        if fitting:
            self._refuse_checkpoint_it_cannot_resume(checkpoint_path)
            self._refuse_other_checkpoint_format(checkpoint_path)
        elif checkpoint_writer(checkpoint_path) != self._checkpoint_format():
            return self._load_weights_of_other_format(checkpoint_path, weights_only)
        if not self.backend.saves_own_state:
            with damage_reported(checkpoint_path):
                checkpoint = super().load_checkpoint(checkpoint_path, weights_only)
            if fitting and "optimizer_states" not in checkpoint:
                raise WeightsOnlyCheckpointError(weights_only_refusal(checkpoint_path))
            return checkpoint
        assert self.lightning_module is not None
        if fitting and holds_weights_only(checkpoint_path):
            raise WeightsOnlyCheckpointError(weights_only_refusal(checkpoint_path))
        checkpoint = self.backend.load_checkpoint(Path(checkpoint_path), load_optimizer_states=fitting,
                                                  strict=self.lightning_module.strict_loading)
        checkpoint.pop(WEIGHTS_LOCATION_KEY, None)  # the folder's own record, not part of Lightning's checkpoint
        return checkpoint

    def _load_weights_of_other_format(self, checkpoint_path: Any, weights_only: bool | None) -> dict[str, Any]:
        """validate / test / predict from a checkpoint another backend wrote (or Lightning's file, for an engine that
        writes folders): its fp32 weights, as `load_from_checkpoint` reads them, into this engine."""
        with damage_reported(checkpoint_path):
            # In host memory, as Lightning's `CheckpointIO` reads a file, whatever device the folder was saved from.
            checkpoint = lightning_checkpoint(checkpoint_path, map_location="cpu", weights_only=weights_only)
        if self.backend.saves_own_state:  # Lightning's `load_model_state_dict` skips such engines
            self.backend.load_model_state_dict(self.lightning_module, checkpoint.pop("state_dict"),
                                               self.lightning_module.strict_loading)
        return checkpoint

    def _refuse_other_checkpoint_format(self, checkpoint_path: Any) -> None:
        saved = saved_plan(checkpoint_path)
        if saved is None:
            return
        current = self.plan or Plan(backend=self.backend_name, optimizer=saved.optimizer)
        if not same_checkpoint_format(saved, current):
            raise ValueError(
                f"The checkpoint {str(checkpoint_path)!r} was written by {saved}, but this fit trains with {current}, "
                f"which cannot read it. Resume with `backend='auto'` (it takes the checkpoint's plan) or pin "
                f"`backend={saved.backend!r}` with the optimizer the checkpoint was trained with."
            )

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        return not self.backend.saves_own_state

    @override
    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        if not self.backend.saves_own_state:
            assert self.lightning_module is not None
            self.backend.load_model_state_dict(self.lightning_module, checkpoint["state_dict"], strict)

    @override
    def pre_backward(self, closure_loss: torch.Tensor) -> None:
        super().pre_backward(closure_loss)
        trainer = getattr(self.lightning_module, "_trainer", None)
        accumulating = trainer is not None and trainer.training and trainer.fit_loop._should_accumulate()
        self.backend.before_backward(last_micro_batch=not accumulating)
        self._inside_update = not accumulating and self.backend.updates_inside_backward()

    @override
    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        stepped = super().optimizer_step(optimizer, closure, model, **kwargs)
        self._inside_update = False
        return stepped

    @override
    def post_backward(self, closure_loss: torch.Tensor) -> None:
        super().post_backward(closure_loss)
        self.backend.after_backward()

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        if self.backend.saves_own_state:
            return
        assert self.lightning_module is not None
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            self.backend.load_optimizer_state_dict(self.lightning_module, optimizer, state)

    @override
    def teardown(self) -> None:
        # Lightning's teardown copies the module and its optimizer state to host memory to free the GPU: up to
        # 16 bytes per parameter of host RAM that no plan accounted for. Everything stays where it trained, ready for
        # a checkpoint or another fit.
        self.precision_plugin.teardown()
        assert self.accelerator is not None
        self.accelerator.teardown()
        self.checkpoint_io.teardown()
        if self._fit.signals_held_in_steps is not None:
            self._fit.signals_held_in_steps.remove()
        if self.backend is not None:
            self.backend.teardown()
        if self._fit.uncapped_gpu_fraction is not None:
            torch.cuda.set_per_process_memory_fraction(self._fit.uncapped_gpu_fraction, self.root_device)
        self._fit = _FitSetup()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            STRATEGY_NAME, cls, description="One GPU, models larger than its memory (lightning_offload)",
            override=True,
        )
        for name in available_backends():
            strategy_registry.register(
                f"{STRATEGY_NAME}_{name}", cls, description=f"`{STRATEGY_NAME}` on the {name!r} backend",
                override=True, backend=name,
            )


def prefer_expandable_segments(device: torch.device) -> None:
    """Turns on the CUDA allocator's expandable segments for this process, unless the user configured the allocator
    or this process already holds GPU memory.

    A plan fills the GPU to within 10% of its memory, and the default allocator can strand more than that between
    fixed segments (bench/RESULTS.md, "Notes moved from the changelog"). Expandable segments grow one mapping instead
    (torchtitan's launcher sets the same).
    """
    if device.type != "cuda" or {"PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"} & os.environ.keys():
        return
    if torch.cuda.is_initialized() and torch.cuda.memory_reserved(device) > 0:
        return
    set_allocator_settings("expandable_segments:True")


def refuse_emulated_bf16(precision: str, device: torch.device) -> None:
    """Refuses a bf16 precision on a GPU that only emulates bf16 (older than Ampere), before anything is built: the
    fused Triton kernels compile no bf16 for it, and emulated bf16 is slower than fp16 for every backend."""
    if not precision.startswith("bf16") or native_bf16(device):
        return
    major, minor = torch.cuda.get_device_capability(device)
    fp16 = " or ".join(f"`backend={name!r}`" for name in registry.backends_training("16-mixed"))
    raise ValueError(
        f"`Trainer(precision={precision!r})`: {torch.cuda.get_device_name(device)} (compute capability "
        f"{major}.{minor}) has no native bf16, which GPUs from Ampere (8.0) on have; it would be emulated, slowly, and "
        f"the fused kernels do not compile for it. Pass `precision='16-mixed'` (with `backend='auto'`, {fp16}) or "
        "'32-true'."
    )


def _check_options_under_auto(options: dict[str, Any]) -> None:
    """Refuses backend options under `backend="auto"` except those a backend takes there (`options_under_auto`),
    whose values each such backend's `Config` checks now, whichever the planner picks later."""
    engines = [backend_class(name) for name in available_backends()]
    under_auto = set().union(*(engine.options_under_auto for engine in engines))
    if not set(options) <= under_auto:
        owners = [f"`backend={engine.name!r}`" for engine in engines
                  if set(options) <= {f.name for f in fields(engine.Config)}]
        raise ValueError(
            f"Backend options {sorted(set(options) - under_auto)} need a backend to belong to, but `backend='auto'` "
            f"lets the planner choose it. Pin the backend they are for ({' or '.join(owners) or 'see each `Config`'});"
            f" under 'auto' only {sorted(under_auto)} may be given."
        )
    for engine in engines:
        if given := engine.options_given_under_auto(options):
            engine.Config.from_options(given)


def set_allocator_settings(settings: str) -> None:
    # torch >= 2.9 moved the setter (the old name warns); no public API sets it after import.
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    setter(settings)


def _move_non_parameter_state(module: torch.nn.Module, device: torch.device) -> None:
    # Lightning's usual `module.to(device)` would copy every parameter to the device, which for an offloaded
    # model is the very thing that does not fit. Buffers and torchmetrics states (kept outside `_buffers`) are small
    # and must sit with the activations. Buffers on the meta device are the engine's to build.
    from torchmetrics import Metric

    for submodule in module.modules():
        if isinstance(submodule, Metric):
            submodule.to(device)
            continue
        for name, buffer in submodule._buffers.items():
            if buffer is not None and not buffer.is_meta:
                submodule._buffers[name] = buffer.to(device)


def _name_lrs_by_the_users_optimizer(monitors: list[Any], stepped: Any, users: torch.optim.Optimizer) -> None:
    """`LearningRateMonitor` names the lr of an optimizer without a scheduler `lr-<class>` after the optimizer
    Lightning steps (the one it wraps, for DeepSpeed's): the engine's here, the user's (`lr-AdamW`) under
    `strategy="auto"`. Each monitor of the run renames it (a scheduled lr is named by its scheduler config); it keeps
    names only, so a monitor reused in a later run holds nothing of this one."""
    stepped = stepped.optimizer if hasattr(stepped, "optimizer") else stepped
    engine_name, user_name = f"lr-{type(stepped).__name__}", f"lr-{type(users).__name__}"
    for monitor in monitors:
        monitor.__dict__.pop("_find_names_from_optimizers", None)  # an earlier fit's renaming
        if engine_name != user_name:
            monitor._find_names_from_optimizers = functools.partial(
                _renamed_lrs, monitor._find_names_from_optimizers, engine_name, user_name)


def _renamed_lrs(find_names: Any, engine_name: str, user_name: str, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """The monitor's names (`lr-<class>`, with `/pg<i>` or `-<count>` after it), the engine's class renamed."""

    def renamed(name: str) -> str:
        rest = name.removeprefix(engine_name)
        return user_name + rest if rest != name and rest[:1] in ("", "/", "-") else name

    names, optimizers = find_names(*args, **kwargs)
    return [[renamed(name) for name in group] for group in names], optimizers


def _refuse_empty_param_groups(optimizer: torch.optim.Optimizer) -> None:
    # Engines drop empty groups, after which the user's LR scheduler fails with an unrelated-looking zip error.
    empty = [index for index, group in enumerate(optimizer.param_groups) if not group["params"]]
    if empty:
        raise ValueError(
            f"Param group(s) {empty} of `{type(optimizer).__name__}` have no parameters. Parameters built in "
            "`configure_model` are 0-element placeholders under the `deepspeed` backend (`p.ndim == 1`, "
            "`p.numel() == 0`): select param groups by module type or parameter name, or read `p.ds_shape`."
        )


class SingleGPUOffloadStrategy(_SingleGPUOffloadCore, SingleDeviceStrategy):
    __doc__ = _SingleGPUOffloadCore.__doc__
    _lightning = "lightning.pytorch"
    _telemetry_callback = ThroughputMonitor

