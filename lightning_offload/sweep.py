"""Summary of a Hydra multirun (`python -m lightning_offload.train -m ...`, a grid or an Optuna search): one row per
job, in the sweep folder."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from lightning_offload.train import METRICS_FILE

log = logging.getLogger(__name__)

COLUMNS = ("overrides", "status", "train/loss", "val/perplexity", "tokens_per_s", "peak_gpu_device_gib",
           "peak_host_rss_gib")


class SweepSummary(Callback):
    """Collects each job's returned metrics; writes `summary.md` and `summary.csv` when the sweep ends."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        row: dict[str, Any] = {"overrides": " ".join(job_return.overrides or []) or "(defaults)"}
        if job_return.status == JobStatus.COMPLETED:
            row["status"] = "ok"
            # The app returns one number (the sweeper's objective) and leaves all its metrics in the run's folder.
            metrics = Path(job_return.hydra_cfg.hydra.runtime.output_dir) / METRICS_FILE
            if metrics.is_file():
                row.update(json.loads(metrics.read_text()))
        else:
            row["status"] = f"failed: {type(job_return._return_value).__name__}: {job_return._return_value}"
        self.rows.append(row)
        # Written after every job: Hydra ends a sweep with a failed job by raising, before `on_multirun_end`.
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        write_summary(self.rows, sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        write_summary(self.rows, sweep_dir)
        log.info("Sweep summary: %s", sweep_dir / "summary.md")


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value if value is not None else "")


def write_summary(rows: list[dict[str, Any]], folder: Path) -> None:
    with (folder / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row.get(column)) for column in COLUMNS) + " |" for row in rows]
    (folder / "summary.md").write_text("\n".join(lines) + "\n")
