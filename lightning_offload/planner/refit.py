"""A later fit of a strategy that keeps its engine: the plan its first run chose (a fit, or a validate, test or predict
that planned), priced again for what this fit asks (clipping, gradient hooks, accumulation, larger batches) with the
planner's memory terms, within the budget that run planned under.

A later fit keeps the engine that holds the trained model, so its plan is not chosen again: what the fit adds that
needs more memory than the plan was checked for is refused before it starts, rather than running out mid-run.
"""

from __future__ import annotations

from typing import Any

from lightning_offload.backends.needs import RunNeeds
from lightning_offload.planner.budget import GIB
from lightning_offload.planner.choose import PlanDoesNotFit, PlanReport, choose, scaled
from lightning_offload.planner.measure import _tensors
from lightning_offload.planner.terms import Plan


def refuse_what_the_kept_plan_cannot_fit(report: PlanReport, plan: Plan, needs: RunNeeds, accumulate: int,
                                         batches: tuple[int, int] | None = None) -> None:
    """Raises `PlanDoesNotFit` when `plan`, which the first run chose by `report`, needs more memory for a later fit
    asking `needs` with `accumulate` micro-batches per step than `report`'s machine and budgets leave it.
    `batches`: the `batch_elements` of this fit's first batch and of the batch the plan was priced for (None: not yet
    known). A fit that adds nothing the first run did not ask for is not priced again: that run's check stands."""
    added, undo = _what_this_fit_adds(report, needs, accumulate, batches)
    if not added:
        return
    stats = report.stats
    if batches is not None and batches[0] > batches[1]:
        stats = scaled(stats, batches[0] / batches[1])
    priced = choose(stats, report.machine, report.ceilings, [plan], accumulate=accumulate, margin=report.margin,
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
        f"This fit adds {added}, and with it the plan this strategy chose when it first ran ({plan}) needs {needed}: "
        f"{short} of the {report.machine.describe()} it was planned within ({100 * (1 - report.margin):.0f}% of "
        "each kept free). Later fits keep the engine that holds the trained model, so its plan is not chosen again. "
        f"{undo}, or train with a new strategy and Trainer that use it from their first run (the planner then "
        "chooses a plan that fits it)."
    )


def batch_elements(batch: Any) -> int:
    """A batch's size as the planner scales it: the elements of its first tensor (tokens, pixels)."""
    first = next(_tensors(batch), None)
    return first.numel() if first is not None else 0


def _what_this_fit_adds(report: PlanReport, needs: RunNeeds, accumulate: int,
                        batches: tuple[int, int] | None) -> tuple[str, str]:
    """What this fit asks that can take more memory and the first fit (`report`) was not planned with, and how to
    leave it out; empty strings: nothing."""
    added, undo = [], []
    if needs.clipping is not None and needs.clipping != report.clipping:
        algorithm = ", gradient_clip_algorithm='value'" if needs.clipping == "value" else ""
        added.append(f"gradient clipping by {needs.clipping} (`gradient_clip_val={needs.gradient_clip_val:g}"
                     f"{algorithm}`)")
        undo.append("`gradient_clip_val=None`")
    if needs.gradient_hooks and not report.holds_gradients:
        owners = ", ".join(f"`{owner}`" for owner in needs.gradient_hooks)
        added.append(f"{owners}'s `on_before_optimizer_step`, which reads every gradient before the step")
        undo.append("no `on_before_optimizer_step` override")
    if accumulate > report.accumulate:
        added.append(f"`accumulate_grad_batches={accumulate}` (when planned: {report.accumulate})")
        undo.append(f"`accumulate_grad_batches={report.accumulate}`")
    if batches is not None and batches[0] > batches[1]:
        this_fit, first_fit = batches
        added.append(f"batches {this_fit / first_fit:.3g}x those it was planned for ({this_fit} elements in the first "
                     f"tensor, {first_fit} then)")
        undo.append("batches no larger than those")
    if not added:
        return "", ""
    return " and ".join(added), f"Leave it out ({', '.join(undo)})"
