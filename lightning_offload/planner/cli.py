"""`lightning-offload plan`: the planner's table for a model config, on this or another machine."""

from __future__ import annotations

from typing import Any

import torch
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_offload.activation_checkpointing import as_checkpointing_config
from lightning_offload.backends import registry
from lightning_offload.planner import Ceilings, Machine, PlanReport, default_precision, load_or_probe
from lightning_offload.planner.choose import ordered, parameter_count
from lightning_offload.planner.lightning import fit_needs, plan_for_module
from lightning_offload.planner.budget import GIB
from lightning_offload.planner.record import plan_state
from lightning_offload.telemetry import ThroughputMonitor

CEILINGS = {"h100": Ceilings()}
# The GPUs `machine=` names (conf/machine/*.yaml): memory and rates, measured or scaled from datasheets.
MACHINE_PRESETS = ("h100_80gb", "a100_80gb", "a6000", "rtx4090")


def machine_of(cfg: DictConfig) -> tuple[Machine, Ceilings, torch.device]:
    """The machine to plan for and its ceilings (probed here, or a preset's). With a GPU here, `gpu_memory_gib` and
    `host_memory_gib` are budgets as in training (they only lower what is free); without one, planning for a GPU
    needs it named (`machine=<preset>`, or `machine.ceilings=h100`) and they describe that GPU machine."""
    here = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    described = here.type != "cuda" and (cfg.gpu_memory_gib is not None or cfg.host_memory_gib is not None)
    if described and cfg.ceilings == "auto":
        raise ValueError(
            "There is no GPU here, so the GPU to plan for must be named (its rates are not probed): pass one of "
            f"machine={','.join(MACHINE_PRESETS)} (conf/machine/), with machine.gpu_memory_gib=... to lower its "
            "memory. Without machine keys the plan is for training on this machine's CPU.")
    machine = Machine.detect(here, max_gpu_memory_gib=cfg.gpu_memory_gib, max_host_memory_gib=cfg.host_memory_gib)
    if described:
        if cfg.gpu_memory_gib is None:
            raise ValueError("Planning for a GPU machine needs its memory: pass machine=<preset> (conf/machine/) "
                             "or machine.gpu_memory_gib=<GiB>.")
        machine = Machine(
            gpu_memory_gib=float(cfg.gpu_memory_gib),
            host_memory_gib=float(cfg.host_memory_gib if cfg.host_memory_gib is not None else machine.host_memory_gib),
        )
    if isinstance(cfg.ceilings, DictConfig):  # a preset's rates
        ceilings = Ceilings(**OmegaConf.to_container(cfg.ceilings))
    elif cfg.ceilings != "auto":
        if cfg.ceilings not in CEILINGS:
            raise ValueError(f"Unknown `machine.ceilings={cfg.ceilings}`. Choose 'auto' or one of {list(CEILINGS)}, "
                             f"or a GPU: machine={','.join(MACHINE_PRESETS)}.")
        ceilings = CEILINGS[cfg.ceilings]
    else:
        ceilings = load_or_probe(here)
    return machine, ceilings, torch.device("cuda") if described else here


def plan_from_config(cfg: DictConfig) -> PlanReport:
    """The plan `python -m lightning_offload.train` picks with the same overrides: the model (its hooks), data,
    trainer (precision, gradient clipping and accumulation), callbacks and strategy groups of the training config,
    planned as the strategy plans them, on the machine `machine.*` describes."""
    machine, ceilings, device = machine_of(cfg.machine)
    module = instantiate(cfg.model)
    strategy, trainer = cfg.strategy, cfg.trainer
    # A GPU `machine=` describes is not here to ask: every preset computes in bf16.
    described = device.type == "cuda" and not torch.cuda.is_available()
    precision = trainer.precision or ("bf16-mixed" if described else default_precision(device))
    report = plan_for_module(
        module, lambda: _example_batch(module, cfg.data), device, backend=_auto_as_none(strategy.backend),
        optimizer=strategy.get("optimizer"),
        checkpointing=as_checkpointing_config(OmegaConf.to_container(strategy.activation_checkpointing)),
        precision=precision, accumulate=int(trainer.accumulate_grad_batches),
        needs=fit_needs(module, _training_callbacks(cfg.callbacks), gradient_clip_val=trainer.gradient_clip_val,
                        gradient_clip_algorithm=trainer.get("gradient_clip_algorithm"),
                        compile_blocks=bool(strategy.get("compile_blocks"))),
        compiled_blocks=bool(strategy.get("compile_blocks")), machine=machine, ceilings=ceilings,
        pinned_levers={key: strategy[key] for key in registry.pinned_levers(_auto_as_none(strategy.backend))
                       if key in strategy})
    if report is None:
        raise ValueError(f"The planner could not measure `model={cfg.model._target_}` (see the warning above).")
    return report


def _training_callbacks(callbacks: DictConfig) -> list[Any]:
    """The callbacks `train` gives the Trainer (the `callbacks` group, then its throughput monitor), as classes: their
    hooks are read, not run, and their arguments (a run folder) need no run. A `_target_` that is not a class (a
    factory) is called."""
    found = []
    for node in callbacks.values():
        target = get_object(node._target_)
        found.append(target if isinstance(target, type) else instantiate(node))
    return [*found, ThroughputMonitor]


def _example_batch(module: Any, data: DictConfig) -> tuple[Any, Any]:
    """What the strategy measures at `fit`: the module's `example_input_array` through `forward`, else the data
    config's first training batch through `training_step`."""
    example = getattr(module, "example_input_array", None)
    if example is not None:
        return example, None
    datamodule = instantiate(data)
    datamodule.setup("fit")
    return next(iter(datamodule.train_dataloader())), lambda batch: module.training_step(batch, 0)


def _auto_as_none(backend: str) -> str | None:
    return None if backend == "auto" else backend


def render(report: PlanReport, rows: int) -> Any:
    """A rich table of the candidates, chosen first, then the fastest that fit."""
    from rich.table import Table

    stats = report.stats
    disk = f", disk {report.disk.describe()}" if report.disk else ""
    table = Table(title=f"{parameter_count(stats.parameters)} parameters, {stats.tokens * report.accumulate} tokens/step "
                        f"on {report.machine.describe()}{disk} ({report.ceilings.device})",
                  caption="\n".join(filter(None, [report.left_out_note, report.reason])), caption_justify="left")
    # Bytes written wear an SSD out (its endurance is rated in TB written): GB per step = TB per 1,000 steps.
    disk_columns = (("disk GiB", "right"), ("written GB/step = TB/1k steps", "right")) if report.disk else ()
    for column, justify in (("", "left"), ("plan", "left"), ("s/step", "right"), ("tokens/s", "right"),
                            ("GPU GiB", "right"), ("host GiB", "right"), ("pinned GiB", "right"), *disk_columns,
                            ("fits", "left")):
        table.add_column(column, justify=justify)
    shown = ([report.chosen] if report.chosen else []) + [
        c for c in ordered(report.candidates) if c is not report.chosen][: rows - (1 if report.chosen else 0)]
    for candidate in shown:
        memory = candidate.memory
        table.add_row("->" if candidate is report.chosen else "", str(candidate.plan),
                      f"{candidate.step_time_s:.3g}", f"{report.tokens_per_second(candidate):,.0f}",
                      f"{memory.gpu_bytes / 2**30:.1f}", f"{memory.host_bytes / 2**30:.1f}",
                      f"{memory.pinned_bytes / 2**30:.1f}",
                      *((f"{memory.disk_bytes / 2**30:.1f}", f"{candidate.step_time.disk_write_bytes / 1e9:.1f}")
                        if report.disk else ()),
                      "yes" if candidate.fits else candidate.refused or "short: " + ", ".join(
                          f"{tier} {gib:.1f} GiB" for tier, gib in candidate.shortfalls.items()))
    return table


def show(report: PlanReport, rows: int) -> None:
    """The table on the console, and why nothing fits when nothing does."""
    from rich.console import Console

    console = Console(width=160)
    console.print(render(report, rows))
    if report.chosen is None:
        console.print(f"[bold red]{report.error()}")


def report_as_dict(report: PlanReport) -> dict[str, Any]:
    """The report for `--json`: the machine, the chosen plan (None when nothing fits) and every candidate."""

    def candidate(c: Any) -> dict[str, Any]:
        return {"plan": str(c.plan), "levers": plan_state(c.plan), "fits": c.fits, "refused": c.refused or None,
                "step_s": c.step_time_s, "tokens_per_s": report.tokens_per_second(c),
                "gpu_gib": c.memory.gpu_bytes / GIB, "host_gib": c.memory.host_bytes / GIB,
                "pinned_gib": c.memory.pinned_bytes / GIB, "disk_gib": c.memory.disk_bytes / GIB,
                "shortfalls_gib": dict(c.shortfalls)}

    return {"parameters": report.stats.parameters, "tokens_per_step": report.stats.tokens * report.accumulate,
            "machine": report.machine.describe(), "device": report.ceilings.device,
            "disk": report.disk.describe() if report.disk else None,
            "chosen": candidate(report.chosen) if report.chosen else None, "reason": report.reason,
            "left_out": dict(report.left_out),
            "error": None if report.chosen else str(report.error()),
            "candidates": [candidate(c) for c in ordered(report.candidates)]}
