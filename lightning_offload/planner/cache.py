"""Where the planner keeps what it probed about this machine (its ceilings, its disks) between runs."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "LIGHTNING_OFFLOAD_CACHE"


def cache_root() -> Path:
    """`$LIGHTNING_OFFLOAD_CACHE`, else the user's cache folder."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "lightning_offload"))
