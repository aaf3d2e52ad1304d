"""`python -m lightning_offload <command>`: the `lightning-offload` command."""

import sys

from lightning_offload.cli import main

sys.exit(main())
