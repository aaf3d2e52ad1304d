"""`lightning-offload <command>` (or `python -m lightning_offload <command>`): the package's one command.

  lightning-offload train [overrides]      the main job (Hydra; `conf/config.yaml`), e.g. trainer.max_steps=50
  lightning-offload plan [overrides]       the planner's table for the same config; --json; exit 1 when nothing fits
  lightning-offload export CKPT OUT --config PRETRAINED   a checkpoint out as a Hugging Face folder
  lightning-offload consolidate CKPT OUT   a checkpoint of any backend as one plain state dict (torch.save)
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

COMMANDS = ("train", "plan", "export", "consolidate")
# `plan`'s exit statuses: a plan fits; none fits; the config or an override is wrong.
PLAN_FITS, NOTHING_FITS, BAD_CONFIG = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        return BAD_CONFIG
    command, rest = argv[0], argv[1:]
    if command == "train":
        return train(rest)
    if command == "plan":
        return plan(rest)
    if command == "export":
        from lightning_offload.export import main as export_main

        export_main(rest, prog="lightning-offload export")
        return 0
    return consolidate(rest)


def train(overrides: list[str]) -> int:
    from lightning_offload.train import main as train_main

    # Hydra's app reads its overrides (and flags such as -m) from the command line.
    sys.argv = [f"{sys.argv[0]} train", *overrides]
    train_main()
    return 0


def plan(args: list[str]) -> int:
    """The planner's table for the training config with `args`' overrides, composed without a run: no outputs
    folder is written."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from lightning_offload.config import register_configs, warn_deprecated_names
    from lightning_offload.planner import cli
    from lightning_offload.planner.choose import PlanDoesNotFit

    parser = argparse.ArgumentParser(prog="lightning-offload plan", description=cli.__doc__)
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    parser.add_argument("overrides", nargs="*", help="the training config's overrides, e.g. model=llama_8b")
    options = parser.parse_args(args)
    register_configs()
    try:
        with initialize_config_module(config_module="lightning_offload.conf", version_base="1.3"):
            cfg = compose(config_name="plan", overrides=options.overrides)
        warn_deprecated_names(cfg)
        report = cli.plan_from_config(cfg)
    except PlanDoesNotFit as refusal:  # pinned levers that leave no plan to compare
        print(f"lightning-offload plan: {refusal}", file=sys.stderr)
        return NOTHING_FITS
    except (ValueError, HydraException, OmegaConfBaseException) as error:
        print(f"lightning-offload plan: {error}", file=sys.stderr)
        return BAD_CONFIG
    if options.json:
        print(json.dumps(cli.report_as_dict(report), indent=2))
    else:
        cli.show(report, int(cfg.rows))
    return PLAN_FITS if report.chosen is not None else NOTHING_FITS


def consolidate(args: list[str]) -> int:
    from lightning_offload.consolidation import consolidate as consolidate_checkpoint

    parser = argparse.ArgumentParser(prog="lightning-offload consolidate",
                                     description="A checkpoint of any backend as one plain fp32 state dict, which "
                                                 "`module.load_state_dict(torch.load(out))` loads.")
    parser.add_argument("checkpoint", help="a checkpoint of any backend (file or folder)")
    parser.add_argument("out", help="the file to write (torch.save)")
    parser.add_argument("--prefix", default="", help="keep only the names under it, without it (e.g. 'model.')")
    options = parser.parse_args(args)
    state_dict = consolidate_checkpoint(options.checkpoint, options.out, prefix=options.prefix)
    print(f"Wrote {options.out} ({len(state_dict)} tensors)")
    return 0


def deprecated_train() -> Any:
    """`lightning-offload-train`: the former name of `lightning-offload train`, kept for one release."""
    warnings.warn("`lightning-offload-train` is deprecated and will be removed in the next release; run "
                  "`lightning-offload train` instead.", FutureWarning, stacklevel=1)
    from lightning_offload.train import main as train_main

    return train_main()
