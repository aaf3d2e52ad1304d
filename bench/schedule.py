"""What a benchmark call still has to run, and how long each cell will take, from the cells measured so far.

A GPU call has a fixed deadline (the device's 10 minutes): a cell started without the time to finish is cut, and its
GPU time is lost. `run.py` starts only the cells whose estimate fits the time left, and `run.py --list` shows what is
left to measure with the time each needs, to split the rest of the matrix into calls.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from bench.matrix import PlannedCell
from bench.models import SIZES

# Statuses that leave a cell to be measured: the session did not get to it, or only the report's placeholder.
UNANSWERED = ("not_run", "not_measured")


def answered(record: dict | None) -> bool:
    """Whether a cell's current record answers it: measured, failed or skipped for a reason; not a cell a call did
    not get to, nor a measurement made out of date by a later change (bench/matrix.yaml `superseded`)."""
    return record is not None and record["status"] not in UNANSWERED and "superseded" not in record


def unmeasured(cells: list[PlannedCell], current: dict[str, dict]) -> list[PlannedCell]:
    """`cells` that the current records (report.load's, by cell name) do not answer yet."""
    return [cell for cell in cells if not answered(current.get(cell.name))]


def estimate_s(cell: PlannedCell, measured: Iterable[dict]) -> float | None:
    """Seconds from the cell's start to its result, or None where no measured cell of its method tells.

    From the measured cell of the same method nearest in size (at equal distance, the same regime): its steps scale
    with the parameters (compute and PCIe bytes both do) and the micro-batches per step; the rest of its wall time
    (imports, building and placing the model, warm-up and compilation) grows more slowly, as the square root of the
    parameters (measured at 1.5B-40.8B: 15-20 s at 3.6B, 40-70 s at 40.8B for the same method)."""
    if cell.skip:
        return 0.0
    runs = [record for record in measured if record["method"] == cell.method.name and record["status"] == "ok"
            and {"wall_s", "step_s_mean"} <= record.keys() and "superseded" not in record]
    if not runs:
        return None
    params = SIZES[cell.size].params
    nearest = min(runs, key=lambda record: (abs(math.log(record["params"] / params)),
                                            record["regime"] != cell.regime.name))
    scale = params / nearest["params"]
    step_s = nearest["step_s_mean"] * scale * cell.regime.accumulate / nearest["accumulate"]
    setup_s = max(nearest["wall_s"] - nearest["step_s_mean"] * nearest["steps"], 0.0) * math.sqrt(scale)
    return setup_s + step_s * cell.regime.steps


def calls(costs: list[float], call_s: float) -> list[list[int]]:
    """Indices of the cells each call of `call_s` seconds would run, as `run.py --deadline-s` runs them: in order,
    each cell started only if its cost fits the time left, the others left to the next call. A cell costlier than
    a whole call gets a call of its own (its own time limit bounds it)."""
    pending, planned = list(range(len(costs))), []
    while pending:
        left, taken = call_s, []
        for index in pending:
            if costs[index] <= max(left, 0) or not taken:
                taken.append(index)
                left -= costs[index]
        planned.append(taken)
        pending = [index for index in pending if index not in taken]
    return planned
