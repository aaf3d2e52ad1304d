"""The planner as the strategy uses it: measure a LightningModule at its first training batch, plan, and turn the
chosen plan back into strategy settings."""

from __future__ import annotations

import dataclasses
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from importlib import import_module
from pathlib import Path
from typing import Any

import torch

from lightning_offload.backends import registry
from lightning_offload.backends.needs import RunNeeds
from lightning_offload.activation_checkpointing import CheckpointingConfig, checkpoints_itself
from lightning_offload.optim import is_adam
from lightning_offload.planner import (
    Ceilings,
    Machine,
    Plan,
    PlanReport,
    compute_dtype,
    load_or_probe,
    measure_module,
    plan,
)
from lightning_offload.planner.choose import SAFETY_MARGIN, parameter_count
from lightning_offload.planner.fallback import UNMEASURED_MARGIN, build_first, estimate_stats, unmeasured_note
from lightning_offload.planner.measure import meta_network
from lightning_offload.planner.preflight import loader_untouched
from lightning_offload.planner.record import fit_ckpt_path
from lightning_offload.planner.budget import GIB
from lightning_offload.planner.memory import checkpoint_bytes
from lightning_offload.saving import checkpoints_on_disk_at_once, remove_stale_leftovers

# Policies the memory model knows; `selective` keeps more than `full` and less than `none`: planned as `none`, so
# its estimate errs on the side of memory.
_PLANNED_POLICY = {"none": "none", "full": "full", "every_k": "every_k", "first_n": "first_n", "offload": "offload",
                   "selective": "none"}


def plan_for_trainer(module: Any, trainer: Any, device: torch.device, *, example: tuple[Any, Any] | None = None,
                     evaluation: bool = False, **levers: Any) -> PlanReport | None:
    """The plan report for fitting `module` with `trainer` on `device` (`levers`: `plan_for_module`'s). When the
    Trainer validates, tests or predicts: with `evaluation`, the plans for fitting on that loop's first batch (what
    they hold bounds what evaluating holds), else None. `example`: the batch and step already fetched
    (`fallback.BuildBeforePlanning` hands them back), else the loop's first batch is fetched."""
    fitting = _fitting(trainer)
    if not fitting and not evaluation:
        return None
    if not fitting:
        # Fetched before planning: an evaluation without data gets Lightning's own error, not the planner's.
        example = example or _evaluation_batch(module, trainer)
    return plan_for_module(module, (lambda: example) if example else (lambda: _example_batch(module, trainer)), device,
                           accumulate=trainer.accumulate_grad_batches,
                           needs=run_needs(module, trainer, compile_blocks=levers.get("compiled_blocks", False)),
                           **levers)


def run_needs(module: Any, trainer: Any, *, compile_blocks: bool, precision: str | None = None) -> RunNeeds:
    """What `module`'s run with `trainer` asks of an engine: its clipping, gradient hooks, callbacks and manual
    optimization when fitting (validate, test and predict train nothing), whether the blocks are compiled, and the
    Trainer's `precision` flag (None: any)."""
    if not _fitting(trainer):
        return RunNeeds(compile_blocks=compile_blocks, precision=precision)
    namespace = "pytorch_lightning" if type(trainer).__module__.startswith("pytorch_lightning") else "lightning.pytorch"
    needs = fit_needs(module, trainer.callbacks, gradient_clip_val=trainer.gradient_clip_val,
                      gradient_clip_algorithm=trainer.gradient_clip_algorithm, compile_blocks=compile_blocks,
                      namespace=namespace)
    resumed = fit_ckpt_path(trainer)
    return dataclasses.replace(needs, resumes_lightning_file=resumed is not None and Path(resumed).is_file(),
                               precision=precision)


def fit_needs(module: Any, callbacks: Sequence[Any], *, gradient_clip_val: float | None,
              gradient_clip_algorithm: str | None, compile_blocks: bool,
              namespace: str = "lightning.pytorch") -> RunNeeds:
    """What fitting `module` with `callbacks` (instances, or classes: their hooks are looked up, never called) and the
    Trainer's clipping asks of an engine: the Trainer's run (`run_needs`) and `lightning-offload plan` read it alike."""
    lightning = import_module(namespace)
    is_overridden = import_module(f"{namespace}.utilities.model_helpers").is_overridden
    owners = [(module, lightning.LightningModule), *((callback, lightning.Callback) for callback in callbacks)]
    return RunNeeds(
        gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm,
        gradient_hooks=tuple(_class_of(owner).__name__ for owner, parent in owners
                             if is_overridden("on_before_optimizer_step", owner, parent)),
        callbacks=tuple(tuple(cls.__name__ for cls in _class_of(callback).__mro__) for callback in callbacks),
        manual_optimization=not module.automatic_optimization, compile_blocks=compile_blocks,
    )


def _class_of(owner: Any) -> type:
    return owner if isinstance(owner, type) else type(owner)


def _fitting(trainer: Any) -> bool:
    return trainer.state.fn is not None and trainer.state.fn.value == "fit"


def plan_for_module(module: Any, example: Callable[[], tuple[Any, Any]], device: torch.device, *,
                    backend: str | None, optimizer: str | None, checkpointing: CheckpointingConfig, precision: str,
                    accumulate: int = 1, needs: RunNeeds = RunNeeds(), world_size: int = 1,
                    ranks_per_host: int | None = None, pinned_levers: dict[str, Any] | None = None,
                    compiled_blocks: bool = False, max_gpu_memory_gib: float | None = None,
                    max_host_memory_gib: float | None = None, machine: Machine | None = None,
                    ceilings: Ceilings | None = None) -> PlanReport | None:
    """The plan report for training `module` on `device` as the strategy does. A model whose forward cannot run on
    the meta device is planned from `fallback.estimate_stats` (the reason is warned); one that cannot even be built
    there raises `fallback.BuildBeforePlanning`. `example()` gives the batch to measure and the step to measure it
    with (None: `forward`). `compiled_blocks`: the strategy compiles the blocks (costed shorter). `machine` (default: this one,
    within `max_gpu_memory_gib` / `max_host_memory_gib`) and `ceilings` (default: probed here) describe another.
    `pinned_levers`: the options of a pinned backend that bound its plans (its spec's `pinned_levers`). `needs`: what
    the run asks of an engine (`run_needs`): backends that cannot run it are left out."""
    dtype = compute_dtype(precision)
    machine = machine or Machine.detect(device, max_gpu_memory_gib=max_gpu_memory_gib,
                                        max_host_memory_gib=max_host_memory_gib)
    batch, step, unmeasured = None, None, None
    # A network `configure_model` builds is built inside the engine's context (on the GPU for some engines).
    built_at_setup = not any(True for _ in module.parameters()) and hasattr(module, "configure_model")
    try:
        batch, step = example()
        # One meta build serves both questions: the model's measurements and its optimizer's class.
        with meta_network(module, dtype):
            try:
                stats = measure_module(module, batch, dtype=dtype, step=step)
            except Exception as error:  # a custom op without a meta kernel, a shape read from tensor values
                stats, unmeasured = estimate_stats(module, batch), error
            adamw_compatible = _steps_adamw(module)
            recomputes_itself = checkpoints_itself(module)
    except Exception as error:  # the meta device cannot build the model (`from_pretrained`), or no batch came
        if not any(True for _ in module.parameters()):
            raise build_first(module, error, machine, None if batch is None else (batch, step)) from error
        # Nothing to know the optimizer by without running it on the real weights: the backend checks it at setup.
        stats, unmeasured, adamw_compatible = estimate_stats(module, batch), error, True
        recomputes_itself = checkpoints_itself(module)
    stats = dataclasses.replace(stats, compiled_blocks=compiled_blocks, built_at_setup=built_at_setup)
    pinned_policy = None if checkpointing.policy == "auto" else _PLANNED_POLICY[checkpointing.policy]
    if unmeasured is not None and pinned_policy is None and stats.blocks:
        pinned_policy = "full"  # estimated activations: only one block's (recomputed) counts in full
    if recomputes_itself:
        # The policies leave blocks that recompute themselves alone (`checkpointing.is_checkpointed`): whatever
        # the strategy's policy, every block runs as under `full`, and a plan counted otherwise would not fit.
        if pinned_policy not in (None, "full"):
            warnings.warn(
                f"`activation_checkpointing={checkpointing.policy!r}` does not apply: every block of "
                f"{type(module).__name__} already checkpoints itself (e.g. `gradient_checkpointing_enable()`). Turn "
                "that off to let the strategy's policy decide.",
                stacklevel=2,
            )
        pinned_policy = "full"
    report = plan(
        stats, machine=machine, ceilings=ceilings or load_or_probe(device), device=device,
        backend=backend or "auto", optimizer=optimizer, activation_checkpointing=pinned_policy,
        every_k=checkpointing.every_k if pinned_policy == "every_k" else None,
        first_n=checkpointing.first_n if pinned_policy == "first_n" else None,
        accumulate=accumulate, precision=precision,
        adamw_compatible=adamw_compatible, world_size=world_size, ranks_per_host=ranks_per_host,
        needs=needs, margin=SAFETY_MARGIN if unmeasured is None else UNMEASURED_MARGIN,
        **(pinned_levers or {}),
    )
    if unmeasured is None:
        return report
    note = unmeasured_note(module, unmeasured, batch)
    warnings.warn(note, stacklevel=2)
    return dataclasses.replace(report, reason=f"{note}\n{report.reason}")


def _example_batch(module: Any, trainer: Any) -> tuple[Any, Any]:
    """The module's `example_input_array` (measured through `forward`), else the first training batch (measured
    through `training_step`, so the loss's tensors count)."""
    example = getattr(module, "example_input_array", None)
    if example is not None:
        return example, None
    # Lightning keeps what `fit(...)` was given (a DataLoader, a datamodule's hook) in the fit loop's data source;
    # the datamodule's `setup` has run by now.
    loader = trainer.fit_loop._data_source.dataloader()
    with loader_untouched(loader):
        batch = next(iter(loader))
    return batch, lambda meta_batch: module.training_step(meta_batch, 0)


# The Trainer's function -> the loop that runs it and the module's step it runs.
_EVALUATION_LOOPS = {"validate": ("validate_loop", "validation_step"), "test": ("test_loop", "test_step"),
                     "predict": ("predict_loop", "predict_step")}


def _evaluation_batch(module: Any, trainer: Any) -> tuple[Any, Any]:
    """The module's `example_input_array`, else the first batch of the evaluation the Trainer runs (measured through
    its step: `validation_step`, `test_step` or `predict_step`)."""
    example = getattr(module, "example_input_array", None)
    if example is not None:
        return example, None
    loop, step = _EVALUATION_LOOPS[trainer.state.fn.value]
    loader = getattr(trainer, loop)._data_source.dataloader()
    if isinstance(loader, (list, tuple)):  # several evaluation loaders: the first is measured
        loader = loader[0]
    with loader_untouched(loader):
        batch = next(iter(loader))
    return batch, lambda meta_batch: getattr(module, step)(meta_batch, 0)


def _steps_adamw(module: Any) -> bool:
    """Whether `configure_optimizers` (run on the module's meta parameters) returns Adam or AdamW: the backends
    that update inside backward need it."""
    try:
        result = module.configure_optimizers()
    except Exception:  # unknowable before the model exists: the chosen backend checks it at setup
        return True
    optimizer = result.get("optimizer") if isinstance(result, dict) else result
    while isinstance(optimizer, (list, tuple)) and optimizer:
        optimizer = optimizer[0]
    optimizer = optimizer.get("optimizer") if isinstance(optimizer, dict) else optimizer
    return is_adam(optimizer)


def checkpointing_of(chosen: Plan) -> CheckpointingConfig:
    return CheckpointingConfig(policy=chosen.checkpointing, every_k=chosen.every_k, first_n=chosen.first_n)


def optimizer_of(chosen: Plan) -> str | None:
    """The strategy's `optimizer=` for a plan the planner chose while the user kept their own optimizer."""
    if registry.spec(chosen.backend).own_adamw or chosen.exact_optimizer:
        return None
    return chosen.optimizer


def check_checkpoint_disk(trainer: Any, report: PlanReport) -> None:
    """Refuses, before training, a `ModelCheckpoint` whose checkpoints cannot fit the free disk of its folder.

    Each save is written next to the previous one before it replaces it (atomic), so a folder keeping k checkpoints
    needs room for k + 1 (and one more for `save_last`)."""
    if report.chosen is None:
        return
    size = checkpoint_bytes(report.stats, report.chosen.plan)
    for callback in trainer.callbacks:
        if type(callback).__name__ != "ModelCheckpoint" or not hasattr(callback, "save_top_k"):
            continue
        folder = Path(callback.dirpath or trainer.default_root_dir)
        existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(
                f"`ModelCheckpoint` cannot write its checkpoints into {str(folder)!r} ({str(existing)!r} is not a "
                "writable folder). Point `dirpath` at a writable folder, or pass `enable_checkpointing=False`."
            )
        remove_stale_leftovers(folder)  # what killed saves left there is space this run may use
        free = shutil.disk_usage(existing).free
        copies = checkpoints_on_disk_at_once(callback.save_top_k, callback.save_last)
        if copies and copies * size > free:
            raise ValueError(
                f"`ModelCheckpoint` in {str(folder)!r} would need {copies} x {size / GIB:.1f} GiB (checkpoints of "
                f"{report.chosen.plan} for {parameter_count(report.stats.parameters)} parameters, each written beside "
                f"the last before replacing it) but the disk has {free / GIB:.1f} GiB free. Point `dirpath` at a "
                "larger disk, keep fewer (`save_top_k=1`, `save_last=False`), or pass `enable_checkpointing=False`."
            )
