"""`python -m lightning_offload.plan model=<config> [machine.gpu_memory_gib=24 ...]`: the planner's table.

Configs: `conf/plan.yaml`, which reads the training app's whole config (`conf/config.yaml`), so the same overrides
preview the plan training picks. From Python, call
`lightning_offload.plan(module, example_input, ...)` instead (see `lightning_offload.planner.plan`).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from lightning_offload.planner import cli
from lightning_offload.train import _config_path


@hydra.main(version_base="1.3", config_path=_config_path(), config_name="plan")
def main(cfg: DictConfig) -> None:
    cli.main(cfg)


if __name__ == "__main__":
    main()
