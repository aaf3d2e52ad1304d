"""The main job: `python -m lightning_offload.train [key=value ...]` (Hydra; configs in `conf/`).

Builds data -> model -> strategy -> callbacks -> loggers -> Trainer from the config and trains. `train` returns the
final metrics; the app writes them to `metrics.json` in the run's folder and returns the one named by
`optimized_metric`, the number Hydra's sweepers (Optuna's included) optimize.
"""

from __future__ import annotations

import json
import logging
import math
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import lightning_offload  # noqa: F401  registers the strategy names before any Trainer is built
from lightning_offload.config import check_run_config, register_configs
from lightning_offload.planner import default_precision
from lightning_offload.telemetry import ThroughputMonitor

log = logging.getLogger(__name__)

# The final metrics of a run, in its output folder.
METRICS_FILE = "metrics.json"


def _config_path() -> str:
    # Installed (wheel or editable): `conf/` ships as `lightning_offload.conf`; a bare source checkout has it beside.
    if find_spec("lightning_offload.conf") is not None:
        return "pkg://lightning_offload.conf"
    return str(Path(__file__).resolve().parent.parent / "conf")


# The module each optional logger needs, and the extra of this package that installs it.
_LOGGER_PACKAGES = {"TensorBoardLogger": ("tensorboard", "tensorboard"), "WandbLogger": ("wandb", "wandb"),
                    "MLFlowLogger": ("mlflow", "mlflow")}


def build_loggers(cfg: DictConfig) -> list[Any]:
    """The `logger` group: one logger (a config with `_target_`) or several (a mapping of name to logger config,
    e.g. `logger=many`). A logger whose package is missing is refused before anything is built."""
    configs = {"logger": cfg} if "_target_" in cfg else {name: node for name, node in cfg.items() if node}
    for name, node in configs.items():
        module, extra = _LOGGER_PACKAGES.get(str(node._target_).rsplit(".", 1)[-1], (None, None))
        if module is not None and find_spec(module) is None:
            raise ModuleNotFoundError(
                f"The `{name}` logger ({node._target_}) needs the `{module}` package, which is not installed. "
                f"Install it with `pip install 'lightning_offload[{extra}]'`, or choose another `logger=`.")
    return [instantiate(node) for node in configs.values()]


# The run's log files we attached to Lightning's loggers: replaced by the next job's in a multirun.
_RUN_LOG_HANDLERS: list[logging.Handler] = []


def _lightning_messages_to_run_log() -> None:
    """Lightning's messages (the planner's table among them) go to its own console handler, not to the root
    logger; the run's log file (Hydra's file handler on the root logger) gets them too."""
    lightning_logs = [logging.getLogger(name) for name in ("lightning.pytorch", "pytorch_lightning")]
    for handler in _RUN_LOG_HANDLERS:  # an earlier job's file
        for lightning_log in lightning_logs:
            lightning_log.removeHandler(handler)
    _RUN_LOG_HANDLERS[:] = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    for lightning_log in lightning_logs:
        if not lightning_log.propagate:
            for handler in _RUN_LOG_HANDLERS:
                lightning_log.addHandler(handler)


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
    loggers = build_loggers(cfg.logger)
    precision = cfg.trainer.precision or default_precision()
    trainer = instantiate(cfg.trainer, strategy=strategy, callbacks=callbacks, logger=loggers, precision=precision)
    _lightning_messages_to_run_log()
    # The run's config as its loggers' hyperparameters (without Hydra's own settings, present under `compose`).
    resolved = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"]),
                                      resolve=True)
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved)
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


def objective(metrics: dict[str, float], name: str) -> float:
    """The number a sweep optimizes: the metric `optimized_metric` names, NaN (a failed trial to Optuna) when the
    run did not log it."""
    if name not in metrics:
        log.warning("`optimized_metric=%s` was not logged by this run; it logged %s. The run returns NaN.", name,
                    sorted(metrics))
        return math.nan
    return float(metrics[name])


@hydra.main(version_base="1.3", config_path=_config_path(), config_name="config")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    metrics = train(cfg)
    # Every metric, for the sweep's summary table; the sweeper gets the one number.
    (Path(HydraConfig.get().runtime.output_dir) / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return objective(metrics, cfg.optimized_metric)


if __name__ == "__main__":
    main()
