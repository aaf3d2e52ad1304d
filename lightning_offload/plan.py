"""Deprecated: `python -m lightning_offload.plan [overrides]`, the former name of `lightning-offload plan`.

Kept for one release. From Python, call `lightning_offload.plan(module, example_input, ...)`.
"""

import sys
import warnings

from lightning_offload.cli import plan

if __name__ == "__main__":
    warnings.warn("`python -m lightning_offload.plan` is deprecated and will be removed in the next release; run "
                  "`lightning-offload plan` (or `python -m lightning_offload plan`) instead.", FutureWarning,
                  stacklevel=1)
    sys.exit(plan(sys.argv[1:]))
