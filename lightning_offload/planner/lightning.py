"""The planner as the strategy uses it: measure a LightningModule at its first training batch, plan, and turn the
chosen plan back into strategy settings."""

from __future__ import annotations

import dataclasses
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from lightning_offload.checkpointing import CheckpointingConfig, checkpoints_itself
from lightning_offload.planner import Machine, Plan, PlanReport, compute_dtype, load_or_probe, measure_module, plan
from lightning_offload.planner.choose import parameter_count
from lightning_offload.planner.measure import meta_network
from lightning_offload.planner.memory import GIB, checkpoint_bytes
from lightning_offload.saving import remove_stale_leftovers

_OWN_OPTIMIZER_BACKENDS = frozenset({"gpu_8bit", "stream", "host_adam"})
# Policies the memory model knows; `selective` keeps more than `full` and less than `none`: planned as `none`, so
# its estimate errs on the side of memory.
_PLANNED_POLICY = {"none": "none", "full": "full", "every_k": "every_k", "offload": "offload", "selective": "none"}


def plan_for_trainer(module: Any, trainer: Any, device: torch.device, *, backend: str | None,
                     optimizer: str | None, checkpointing: CheckpointingConfig,
                     precision: str, world_size: int = 1, ranks_per_host: int | None = None,
                     gpu_state_blocks: int | None = None, compiled_blocks: bool = False) -> PlanReport | None:
    """The plan report for fitting `module` with `trainer` on `device`, or None when it cannot be measured (the
    reason is warned) or the Trainer is not fitting. `compiled_blocks`: the strategy compiles the blocks (costed
    shorter)."""
    if trainer.state.fn is None or trainer.state.fn.value != "fit":
        return None
    dtype = compute_dtype(precision)
    try:
        batch, step = _example_batch(module, trainer)
        # One meta build serves both questions: the model's measurements and its optimizer's class.
        with meta_network(module, dtype):
            stats = dataclasses.replace(measure_module(module, batch, dtype=dtype, step=step),
                                        compiled_blocks=compiled_blocks)
            adamw_compatible = _steps_adamw(module)
            recomputes_itself = checkpoints_itself(module)
    except Exception as error:  # a user's model or loader the meta device cannot run: plan without it
        warnings.warn(
            f"The planner could not measure {type(module).__name__} on the meta device ({type(error).__name__}: "
            f"{error}), so no memory check ran. Set `example_input_array` on the module to help it.",
            stacklevel=2,
        )
        return None
    pinned_policy = None if checkpointing.policy == "auto" else _PLANNED_POLICY[checkpointing.policy]
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
    return plan(
        stats, machine=Machine.detect(device), ceilings=load_or_probe(device), device=device,
        backend=backend or "auto", optimizer=optimizer, checkpointing=pinned_policy,
        every_k=checkpointing.every_k if pinned_policy == "every_k" else None,
        accumulate=trainer.accumulate_grad_batches, precision=precision,
        adamw_compatible=adamw_compatible, world_size=world_size, ranks_per_host=ranks_per_host,
        clips_gradients=bool(trainer.gradient_clip_val) and trainer.gradient_clip_algorithm in (None, "norm"),
        gpu_state_blocks=gpu_state_blocks,
    )


def _example_batch(module: Any, trainer: Any) -> tuple[Any, Any]:
    """The module's `example_input_array` (measured through `forward`), else the first training batch (measured
    through `training_step`, so the loss's tensors count)."""
    example = getattr(module, "example_input_array", None)
    if example is not None:
        return example, None
    # Lightning keeps what `fit(...)` was given (a DataLoader, a datamodule's hook) in the fit loop's data source;
    # the datamodule's `setup` has run by now.
    loader = trainer.fit_loop._data_source.dataloader()
    batch = next(iter(loader))
    return batch, lambda meta_batch: module.training_step(meta_batch, 0)


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
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


def checkpointing_of(chosen: Plan) -> CheckpointingConfig:
    return CheckpointingConfig(policy=chosen.checkpointing, every_k=chosen.every_k)


def optimizer_of(chosen: Plan) -> str | None:
    """The strategy's `optimizer=` for a plan the planner chose while the user kept their own optimizer."""
    if chosen.backend in _OWN_OPTIMIZER_BACKENDS or chosen.exact_optimizer:
        return None
    return chosen.optimizer


def backend_options_of(chosen: Plan, config: type) -> dict[str, Any]:
    """The plan's levers that are backend options: the streaming plan's resident blocks, host_adam's blocks whose
    optimizer state stays on the GPU, fsdp's accumulation on the GPU."""
    known = {f.name for f in dataclasses.fields(config)}
    levers = {"resident_blocks": chosen.resident_blocks, "gpu_state_blocks": chosen.resident_blocks,
              "accumulate_on_gpu": chosen.accumulate_on_gpu}
    return {name: value for name, value in levers.items() if name in known}


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
        kept = callback.save_top_k if callback.save_top_k > 0 else (2 if callback.save_top_k < 0 else 0)
        copies = kept + bool(callback.save_last) + 1 if kept or callback.save_last else 0
        if copies and copies * size > free:
            raise ValueError(
                f"`ModelCheckpoint` in {str(folder)!r} would need {copies} x {size / GIB:.1f} GiB (checkpoints of "
                f"{report.chosen.plan} for {parameter_count(report.stats.parameters)} parameters, each written beside "
                f"the last before replacing it) but the disk has {free / GIB:.1f} GiB free. Point `dirpath` at a "
                "larger disk, keep fewer (`save_top_k=1`, `save_last=False`), or pass `enable_checkpointing=False`."
            )
