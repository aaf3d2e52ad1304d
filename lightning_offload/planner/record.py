"""The chosen plan as part of the run: logged with the hyperparameters, saved in every checkpoint, and the plan a
resumed run takes again, since each backend writes checkpoints only it can read."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from lightning_offload.planner.choose import PlanDoesNotFit, PlanReport, choose
from lightning_offload.planner.budget import GIB
from lightning_offload.planner.terms import Plan

# The checkpoint key that holds the plan a run trained with (its `Plan` fields).
PLAN_KEY = "lightning_offload_plan"


def plan_state(plan: Plan) -> dict[str, Any]:
    return dataclasses.asdict(plan)


def plan_of_state(state: dict[str, Any]) -> Plan:
    known = {f.name for f in dataclasses.fields(Plan)}
    return Plan(**{name: value for name, value in state.items() if name in known})


def plan_hyperparameters(plan: Plan, report: PlanReport | None) -> dict[str, Any]:
    """The plan's levers, and what the planner expected of it, as flat hyperparameters for every logger."""
    params: dict[str, Any] = {f"plan/{name}": value for name, value in plan_state(plan).items()}
    params["plan"] = str(plan)
    chosen = report.chosen if report is not None else None
    if chosen is not None:
        params.update({"plan/machine": report.machine.describe(), "plan/step_s": chosen.step_time_s,
                       "plan/gpu_gib": chosen.memory.gpu_bytes / GIB, "plan/host_gib": chosen.memory.host_bytes / GIB})
    return params


def same_checkpoint_format(a: Plan, b: Plan) -> bool:
    """Whether checkpoints of `a` load into `b`: the backend writes the format, the optimizer its state's shape;
    the other levers (checkpointing, blocks on the GPU) are not in the checkpoint."""
    return (a.backend, a.optimizer) == (b.backend, b.optimizer)


def saved_plan(path: str | Path) -> Plan | None:
    """The plan a checkpoint (a file, or a backend's folder) was trained with; None when it holds none.

    Tensors are memory-mapped, not read: looking costs no memory whatever the checkpoint's size."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        # A backend's folder keeps Lightning's state in one of its files, usually the smallest.
        files = sorted(path.rglob("*.pt"), key=lambda file: file.stat().st_size)
    else:
        return None
    for file in files:
        state = _plan_in(file)
        if state is not None:
            return plan_of_state(state)
    return None


def _plan_in(file: Path) -> dict[str, Any] | None:
    import torch

    try:
        # weights_only: reading the plan never runs code from a file, whatever Lightning's own load will allow.
        checkpoint = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # not a torch zip file, or objects beyond tensors and containers: no plan we could read
        return None
    if not isinstance(checkpoint, dict):
        return None
    client_state = checkpoint.get("client_state")
    for holder in (checkpoint, client_state if isinstance(client_state, dict) else {}):
        if isinstance(holder.get(PLAN_KEY), dict):
            return holder[PLAN_KEY]
    return None


def resume_report(report: PlanReport, saved: Plan, path: str | Path) -> PlanReport:
    """`report` narrowed to `saved`, the plan the checkpoint at `path` was trained with: chosen when it fits this
    machine (with any checkpointing policy the user pinned), refused with the shortfall when it does not."""
    policies = {(plan.checkpointing, plan.every_k, plan.first_n) for plan in report.plans}
    if len(policies) == 1:  # the user pinned the policy, which is not part of the checkpoint
        checkpointing, every_k, first_n = policies.pop()
        # `first_n` left to the planner: the count the checkpoint's plan chose.
        first_n = saved.first_n if first_n is None and saved.checkpointing == checkpointing else first_n
        saved = dataclasses.replace(saved, checkpointing=checkpointing, every_k=every_k, first_n=first_n)
    resumed = choose(report.stats, report.machine, report.ceilings, [saved], accumulate=report.accumulate,
                     allow_eight_bit=True, world_size=report.world_size, ranks_per_host=report.ranks_per_host,
                     holds_gradients=report.holds_gradients, clipping=report.clipping, disk=report.disk,
                     disk_pinned=report.disk_pinned)
    if resumed.chosen is not None:
        return dataclasses.replace(resumed, reason=f"Resuming {str(path)!r} with the plan it was trained with: "
                                                   f"{saved}.")
    short = ", ".join(f"{tier} short by {gib:.1f} GiB" for tier, gib in resumed.candidates[0].shortfalls.items())
    raise PlanDoesNotFit(
        f"The checkpoint {str(path)!r} was trained with {saved}, which no longer fits this machine "
        f"({report.machine.describe()}): {short}. Its backend wrote a checkpoint only that plan reads, so "
        "`backend='auto'` does not re-plan. Resume where it fits (free memory, or raise the budgets), or start a "
        "new run from its weights (`lightning_offload.consolidate`, then `module.load_state_dict`) without "
        "`ckpt_path`."
    )


def fit_ckpt_path(trainer: Any) -> str | Path | None:
    """The checkpoint `trainer.fit(ckpt_path=...)` resumes from, known before the model is built.

    Lightning resolves the path (`"last"`, `"hpc"`, a `trainer.ckpt_path` the user set) before `Trainer._run` and
    passes it only as that call's argument; `trainer.ckpt_path` follows when it restores, after `configure_model`
    (and keeps an earlier fit's path). The strategy's setup runs inside `_run`, so the path is that call's argument,
    found by the code of the Trainer class's own `_run` (either Lightning namespace, a subclass's override
    included); outside a `_run`, the path the user set on the Trainer."""
    runs = {run.__code__ for klass in type(trainer).__mro__ if hasattr(run := vars(klass).get("_run"), "__code__")}
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in runs and frame.f_locals.get("self") is trainer and "ckpt_path" in frame.f_locals:
            return frame.f_locals["ckpt_path"]
        frame = frame.f_back
    return trainer.ckpt_path
