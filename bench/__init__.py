"""lightning_offload's benchmark: single_gpu_offload beside every alternative a user has, and the hardware's limit.

Not part of the installed package; run from the repository root as `python -m bench list|run|report|probe|call`
(bench/__main__.py): the matrix (one subprocess per cell), the machine's ceilings, MATRIX.md and its plot from
results files, and the named GPU calls of calls.yaml.
"""

# The line a cell or probe process prints its result on; bench/run.py reads the last one.
RESULT_PREFIX = "RESULT "
GIB = 2**30
# The planner's step time is its steady state and warm-up steps take longer: at 1.0 the predicted-timeout guard
# refuses only plans whose predicted steps alone overrun the time left, so a refused plan would have timed out unless
# the planner overestimates it by more than the overrun.
PREDICTION_MARGIN = 1.0


class PredictedTimeout(RuntimeError):
    """A cell stopped at train start because the planner predicts its plan cannot run the regime's steps before
    bench/run.py's time limit (bench/runners.py raises it; bench/run.py records a timeout). `planned` is what the
    planner predicted, kept in the record as a measured cell keeps it."""

    def __init__(self, message: str, planned: dict[str, object]) -> None:
        super().__init__(message)
        self.planned = planned
