"""Where two runs' train-loss curves (from `bench/studies/optim_convergence.py --curves FILE`) first differ, per seed.

    python -m bench.studies.compare_curves FILE RUN OTHER_RUN

Runs of the same update arithmetic under deterministic kernels must print "first differing step None, max |diff| 0".
"""

from __future__ import annotations

import json
import sys


def compare(curves: dict[str, dict[str, list[float]]], run: str, other: str) -> list[str]:
    lines = []
    for seed, by_run in curves.items():
        a, b = by_run[run], by_run.get(other, [])
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        gap = max((abs(x - y) for x, y in zip(a, b)), default=float("nan"))
        lines.append(f"seed {seed}: {other} vs {run} over {len(b)} steps: first differing step {first}, "
                     f"max |diff| {gap:.4g}")
    return lines


if __name__ == "__main__":
    path, run, other = sys.argv[1:4]
    with open(path) as file:
        print("\n".join(compare(json.load(file), run, other)))
