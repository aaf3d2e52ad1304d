"""A later fit of a strategy that keeps its engine: the plan its first fit chose, priced again for what this fit asks
(clipping, gradient hooks, accumulation) with the planner's memory terms, within the budget that fit planned under.

A later fit keeps the engine that holds the trained model, so its plan is not chosen again: what the fit adds that
needs more memory than the plan was checked for is refused before it starts, rather than running out mid-run.
"""

from __future__ import annotations

from lightning_offload.backends.spec import RunNeeds
from lightning_offload.planner.budget import GIB
from lightning_offload.planner.choose import SAFETY_MARGIN, PlanDoesNotFit, PlanReport, choose
from lightning_offload.planner.terms import Plan


def refuse_what_the_kept_plan_cannot_fit(report: PlanReport, plan: Plan, needs: RunNeeds, accumulate: int) -> None:
    """Raises `PlanDoesNotFit` when `plan`, which the first fit chose by `report`, needs more memory for a later fit
    asking `needs` with `accumulate` micro-batches per step than `report`'s machine and budgets leave it. A fit that
    adds nothing the first did not ask for is not priced again: the first fit's check stands."""
    added, undo = _what_this_fit_adds(report, needs, accumulate)
    if not added:
        return
    priced = choose(report.stats, report.machine, report.ceilings, [plan], accumulate=accumulate,
                    allow_eight_bit=True, world_size=report.world_size, ranks_per_host=report.ranks_per_host,
                    holds_gradients=needs.holds_gradients, clipping=needs.clipping, disk=report.disk,
                    disk_pinned=True)  # the first fit took its disk traffic; only its memory is in question
    [candidate] = priced.candidates
    if not candidate.shortfalls:
        return
    memory = candidate.memory
    needed = f"{memory.gpu_bytes / GIB:.2f} GiB GPU, {memory.host_bytes / GIB:.2f} GiB host" + (
        f", {memory.disk_bytes / GIB:.2f} GiB disk" if memory.disk else "")
    short = ", ".join(f"{tier} short by {gib:.2f} GiB" for tier, gib in candidate.shortfalls.items())
    raise PlanDoesNotFit(
        f"This fit adds {added}, and with it the plan this strategy's first fit chose ({plan}) needs {needed}: "
        f"{short} of the {report.machine.describe()} it was planned within ({100 * (1 - SAFETY_MARGIN):.0f}% of "
        "each kept free). Later fits keep the engine that holds the trained model, so its plan is not chosen again. "
        f"{undo}, or train with a new strategy and Trainer that use it from their first fit (the planner then "
        "chooses a plan that fits it)."
    )


def _what_this_fit_adds(report: PlanReport, needs: RunNeeds, accumulate: int) -> tuple[str, str]:
    """What of `needs` and `accumulate` that can take more memory the first fit (`report`) was not planned with, and
    how to leave it out; empty strings: nothing."""
    added, undo = [], []
    if needs.clipping is not None and needs.clipping != report.clipping:
        algorithm = ", gradient_clip_algorithm='value'" if needs.clipping == "value" else ""
        added.append(f"gradient clipping by {needs.clipping} (`gradient_clip_val={needs.gradient_clip_val:g}"
                     f"{algorithm}`)")
        undo.append("`gradient_clip_val=None`")
    if needs.gradient_hooks and not report.holds_gradients:
        added.append(f"{', '.join(f'`{owner}`' for owner in needs.gradient_hooks)}'s `on_before_optimizer_step`, which reads every "
                     "gradient before the step")
        undo.append("no `on_before_optimizer_step` override")
    if accumulate > report.accumulate:
        added.append(f"`accumulate_grad_batches={accumulate}` (the first fit: {report.accumulate})")
        undo.append(f"`accumulate_grad_batches={report.accumulate}`")
    if not added:
        return "", ""
    return " and ".join(added), f"Leave it out ({', '.join(undo)})"
