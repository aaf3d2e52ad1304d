"""A sweep in which a job fails still leaves its summary, with the failure's message."""

from __future__ import annotations

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from lightning_offload.sweep import SweepSummary
from lightning_offload.train import METRICS_FILE


def test_each_job_updates_the_summary_and_a_failure_is_spelled_out(tmp_path) -> None:
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}})
    job_dir = tmp_path / "sweep" / "0"
    job_dir.mkdir(parents=True)
    (job_dir / METRICS_FILE).write_text('{"train/loss": 1.5}')
    job_hydra = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(job_dir)}}})
    summary = SweepSummary()
    summary.on_job_end(config, JobReturn(overrides=["optimizer=adamw"], status=JobStatus.COMPLETED, _return_value=1.5,
                                         hydra_cfg=job_hydra))
    summary.on_job_end(config, JobReturn(overrides=["data.batch_size=0"], status=JobStatus.FAILED,
                                         _return_value=ValueError("`data.batch_size` must be an integer >= 1")))
    # Hydra raises the failed job's error here, so `on_multirun_end` never runs.
    text = (tmp_path / "sweep" / "summary.md").read_text()
    assert "| optimizer=adamw | ok | 1.5 |" in text
    assert "failed: ValueError: `data.batch_size` must be an integer >= 1" in text
    assert (tmp_path / "sweep" / "summary.csv").read_text().count("\n") == 3
