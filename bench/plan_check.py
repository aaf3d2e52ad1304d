"""The planner's estimates, as the code stands now, beside what the benchmark measured for our rows.

    python -m bench.plan_check [bench/results.jsonl ...]

One line per current measured cell of a `single_gpu_offload` row: the plan it ran (as recorded), the estimates of
that plan for that model and batch now (measured on the meta device, as the strategy measures it) beside the GPU
peaks torch and the device saw, the host RSS, and the median step. Run it after a change to the memory or cost model
or after a GPU session: a plan estimated below its measured peak is one the planner may choose where it does not
fit, and a step time far off the measured one ranks plans wrongly. Step times are costed at the ceilings the cell's
planner probed (`planner_ceilings`), or at the H100 machine's defaults for cells recorded before those were kept.
"""

from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path


import torch

from bench.matrix import load_config
from bench.methods import OURS
from bench.report import load
from lightning_offload.planner import (GIB, Ceilings, ModelStats, Plan, estimate_memory, estimate_step_time,
                                      measure_module)

DEFAULT_RESULTS = Path(__file__).with_name("results.jsonl")
# Plans recorded before they named the strategy's option read `checkpointing=`.
_PLAN = re.compile(r"(?P<backend>\w+) \+ (?P<optimizer>\w+) \+ (?:activation_)?checkpointing=(?P<policy>\w+?)"
                   r"(?:_(?P<k>\d+))?"
                   r"(?:, (?P<blocks>\d+) (?:resident blocks|blocks' state on the GPU))?"
                   r"(?P<accumulated>, gradients accumulated on the GPU)?$")


@dataclass(frozen=True)
class Check:
    cell: str
    plan: str
    estimate_gib: float
    torch_gib: float
    device_gib: float
    host_estimate_gib: float
    host_rss_gib: float
    step_estimate_s: float
    step_s: float


def parse_plan(text: str) -> Plan:
    """The `Plan` whose `str` is `text` (what a cell records as its `plan`)."""
    match = _PLAN.match(text)
    if match is None:
        raise ValueError(f"Not a plan: {text!r}")
    policy = f"{match['policy']}_{'k' if match['policy'] == 'every' else 'n'}" if match["k"] else match["policy"]
    return Plan(backend=match["backend"], optimizer=match["optimizer"], checkpointing=policy,
                every_k=int(match["k"] or 2) if policy == "every_k" else 2,
                first_n=int(match["k"]) if policy == "first_n" else None, resident_blocks=int(match["blocks"] or 0),
                accumulate_on_gpu=bool(match["accumulated"]))


@functools.cache
def cell_stats(method: str, size: str, micro_batch: int, seq: int) -> ModelStats:
    """What the strategy measures of the cell's LightningModule at its batch shape (bf16)."""
    from bench.runners import LlamaModule

    options = load_config().methods[method].options
    module = LlamaModule(size, options["checkpointing"], options["optimizer"], options.get("loss", "full"))
    tokens = torch.zeros(micro_batch, seq, dtype=torch.long)
    stats = measure_module(module, tokens, dtype=torch.bfloat16, step=lambda batch: module.training_step(batch, 0))
    return replace(stats, compiled_blocks=options.get("backend_options", {}).get("compile_blocks", False))


def checks(paths: list[Path]) -> list[Check]:
    """Every current measured cell of our rows that recorded its plan, with the plan's estimates now (rows whose
    module builds only on CUDA, Liger-Kernel's loss, are left out: this runs on the CPU)."""
    found = []
    methods = load_config().methods
    for name, record in sorted(load(paths)[1].items()):
        if (not record["method"].startswith(f"{OURS}_") or record["status"] != "ok" or "superseded" in record
                or not record.get("plan") or not methods[record["method"]].runs_on_cpu):
            continue
        stats = cell_stats(record["method"], record["size"], record["micro_batch"], record["seq"])
        plan, accumulate = parse_plan(record["plan"]), record["accumulate"]
        estimate = estimate_memory(stats, plan, accumulate=accumulate)
        ceilings = Ceilings(**record.get("planner_ceilings", {}))
        step = estimate_step_time(stats, plan, ceilings, accumulate=accumulate)
        found.append(Check(name, record["plan"], estimate.gpu_bytes / GIB, record["peak_gpu_torch_gib"],
                           record["peak_gpu_device_gib"], estimate.host_bytes / GIB, record["peak_host_rss_gib"],
                           step.total, record["step_s_median"]))
    return found


def main(argv: list[str] | None = None) -> None:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])] or [DEFAULT_RESULTS]
    print(f"{'cell':60} {'plan':75} {'GPU est':>8} {'torch':>7} {'device':>7} {'- torch':>8} {'- device':>8} "
          f"{'host est':>8} {'RSS':>7} {'- RSS':>7} {'step est':>8} {'step':>7} {'/ step':>6}")
    for check in checks(paths):
        print(f"{check.cell:60} {check.plan:75} {check.estimate_gib:8.2f} {check.torch_gib:7.2f} "
              f"{check.device_gib:7.2f} {check.estimate_gib - check.torch_gib:+8.2f} "
              f"{check.estimate_gib - check.device_gib:+8.2f} {check.host_estimate_gib:8.2f} "
              f"{check.host_rss_gib:7.2f} {check.host_estimate_gib - check.host_rss_gib:+7.2f} "
              f"{check.step_estimate_s:8.3f} {check.step_s:7.3f} {check.step_estimate_s / check.step_s:6.2f}")


if __name__ == "__main__":
    main()
