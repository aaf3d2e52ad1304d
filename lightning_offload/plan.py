"""`python -m lightning_offload.plan model=<config> [machine=h100_80gb ...]`: `lightning-offload plan`.

Configs: `conf/plan.yaml`, which reads the training app's whole config (`conf/config.yaml`), so the same overrides
preview the plan training picks. From Python, call
`lightning_offload.plan(module, example_input, ...)` instead (see `lightning_offload.planner.plan`).
"""

import sys

from lightning_offload.cli import plan

if __name__ == "__main__":
    sys.exit(plan(sys.argv[1:]))
