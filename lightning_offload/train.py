"""The main job: `python -m lightning_offload.train [key=value ...]` (Hydra; configs in `conf/`).

Builds data -> model -> strategy -> callbacks -> logger -> Trainer from the config, trains, and returns the final
metrics (used by sweeps and tests).
"""

from __future__ import annotations

import logging
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import lightning_offload  # noqa: F401  registers the strategy names before any Trainer is built
from lightning_offload.config import check_run_config, register_configs
from lightning_offload.telemetry import ThroughputMonitor

log = logging.getLogger(__name__)


def _config_path() -> str:
    # Installed (wheel or editable): `conf/` ships as `lightning_offload.conf`; a bare source checkout has it beside.
    if find_spec("lightning_offload.conf") is not None:
        return "pkg://lightning_offload.conf"
    return str(Path(__file__).resolve().parent.parent / "conf")


def default_precision() -> str:
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def train(cfg: DictConfig, extra_callbacks: list[Any] = ()) -> dict[str, float]:
    import lightning.pytorch as pl

    check_run_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    log.info("Data: %s", cfg.data._target_)
    # Plain containers, not Hydra's: the hyperparameters Lightning saves must load with `weights_only=True`.
    datamodule = instantiate(cfg.data, _convert_="all")
    log.info("Model: %s (%s)", cfg.model._target_, cfg.model.get("arch") or cfg.model.get("pretrained"))
    model = instantiate(cfg.model, _convert_="all")
    log.info("Strategy: %s", OmegaConf.to_container(cfg.strategy))
    strategy = instantiate(cfg.strategy)
    throughput = ThroughputMonitor()
    callbacks = [instantiate(callback) for callback in cfg.callbacks.values()] + [throughput, *extra_callbacks]
    logger = instantiate(cfg.logger)
    precision = cfg.trainer.precision or default_precision()
    trainer = instantiate(cfg.trainer, strategy=strategy, callbacks=callbacks, logger=logger, precision=precision)
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    metrics.update(throughput.summary())
    report = getattr(trainer.strategy, "plan_report", None)
    if report is not None and report.chosen is not None:
        # What the planner predicted for the plan that ran, beside what the run measured.
        log.info("Plan: %s", report.chosen.plan)
        metrics.update({"plan/step_s": report.chosen.step_time_s,
                        "plan/gpu_gib": report.chosen.memory.gpu_bytes / 2**30,
                        "plan/host_gib": report.chosen.memory.host_bytes / 2**30})
    log.info("Final metrics: %s", metrics)
    log.info("Outputs: %s", trainer.default_root_dir)
    return metrics


register_configs()


@hydra.main(version_base="1.3", config_path=_config_path(), config_name="config")
def main(cfg: DictConfig) -> Any:
    return train(cfg)


if __name__ == "__main__":
    main()
