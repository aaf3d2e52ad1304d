"""lightning_offload's benchmark: single_gpu_offload beside every alternative a user has, and the hardware's limit.

Not part of the installed package. Entry points: `run.py` (the matrix, one subprocess per cell), `cell.py` (one
cell), `probe.py` (the machine's ceilings), `report.py` (MATRIX.md and its plot from results files).
"""

# The line a cell or probe process prints its result on; bench/run.py reads the last one.
RESULT_PREFIX = "RESULT "
GIB = 2**30
