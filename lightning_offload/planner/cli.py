"""`python -m lightning_offload.plan`: the planner's table for a model config, on this or another machine."""

from __future__ import annotations

from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_offload.planner import Ceilings, Machine, PlanReport, compute_dtype, load_or_probe, measure_module, plan
from lightning_offload.planner.choose import ordered, parameter_count

CEILINGS = {"h100": Ceilings()}


def machine_of(cfg: DictConfig) -> tuple[Machine, Ceilings, torch.device]:
    """The machine to plan for: this one, with any tier overridden; ceilings probed here or named."""
    here = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    overridden = cfg.gpu_memory_gib is not None or cfg.host_memory_gib is not None
    detected = Machine.detect(here)
    if overridden:
        machine = Machine(
            gpu_memory_gib=float(cfg.gpu_memory_gib if cfg.gpu_memory_gib is not None else 79.2),
            host_memory_gib=float(cfg.host_memory_gib if cfg.host_memory_gib is not None else detected.host_memory_gib),
        )
    else:
        machine = detected
    if cfg.ceilings != "auto":
        if cfg.ceilings not in CEILINGS:
            raise ValueError(f"Unknown `machine.ceilings={cfg.ceilings}`. Choose 'auto' or one of {list(CEILINGS)}.")
        ceilings = CEILINGS[cfg.ceilings]
    else:
        ceilings = load_or_probe(here) if here.type == "cuda" or not overridden else CEILINGS["h100"]
    device = here if not overridden else torch.device("cuda")
    return machine, ceilings, device


def plan_from_config(cfg: DictConfig) -> PlanReport:
    module = instantiate(cfg.model)
    data = cfg.data
    tokens = torch.zeros(int(data.batch_size), int(data.seq_len), dtype=torch.long)
    stats = measure_module(module, (tokens, tokens), dtype=compute_dtype(cfg.precision),
                           step=lambda batch: module.training_step(batch, 0))
    machine, ceilings, device = machine_of(cfg.machine)
    policy = cfg.checkpointing.policy
    return plan(stats, machine=machine, ceilings=ceilings, device=device, backend=cfg.backend,
                optimizer=cfg.optimizer.name, checkpointing=None if policy == "auto" else policy,
                every_k=cfg.checkpointing.get("every_k") if policy == "every_k" else None,
                accumulate=int(cfg.accumulate), precision=cfg.precision, gpu_state_blocks=cfg.get("gpu_state_blocks"),
                nvme_path=cfg.get("nvme_path"), offload_device=cfg.get("offload_device"),
                nvme_state=cfg.get("nvme_state"))


def render(report: PlanReport, rows: int) -> Any:
    """A rich table of the candidates, chosen first, then the fastest that fit."""
    from rich.table import Table

    stats = report.stats
    disk = f", disk {report.disk.describe()}" if report.disk else ""
    table = Table(title=f"{parameter_count(stats.parameters)} parameters, {stats.tokens * report.accumulate} tokens/step "
                        f"on {report.machine.describe()}{disk} ({report.ceilings.device})",
                  caption=report.reason, caption_justify="left")
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


def main(cfg: DictConfig) -> PlanReport:
    from rich.console import Console

    report = plan_from_config(cfg)
    console = Console(width=160)
    console.print(render(report, int(cfg.rows)))
    if report.chosen is None:
        console.print(f"[bold red]{report.error()}")
    return report
