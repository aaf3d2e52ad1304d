"""Sweeps of the main job: the app's return value is the sweeper's objective; every sweep writes its summary."""

from __future__ import annotations

import csv
import math
import subprocess
import sys

import pytest
import yaml

from lightning_offload.train import objective
from tests.test_train import SHORT_RUN


def test_the_objective_is_the_named_metric_and_nan_when_it_was_not_logged(caplog) -> None:
    metrics = {"val/perplexity": 3.5, "train/loss": 1.25}
    assert objective(metrics, "train/loss") == metrics["train/loss"]
    assert math.isnan(objective(metrics, "val/perplexit"))
    assert "`optimized_metric=val/perplexit` was not logged" in caplog.text and "'val/perplexity'" in caplog.text


@pytest.mark.slow
def test_an_optuna_search_from_the_command_line_optimizes_the_returned_metric(tmp_path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    trials = 3
    command = [sys.executable, "-m", "lightning_offload.train", "hparams_search=optuna",
               f"hydra.sweeper.n_trials={trials}", f"hydra.sweep.dir={tmp_path}", *SHORT_RUN,
               "trainer.max_steps=3", "trainer.val_check_interval=3"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert len(rows) == trials and all(row["status"] == "ok" for row in rows)
    perplexities = [float(row["val/perplexity"]) for row in rows]
    assert len({row["overrides"] for row in rows}) == trials and all(p > 1 for p in perplexities)
    # Optuna received each trial's float: its best is the smallest perplexity of the summary.
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(perplexities), rel=1e-4)
    assert (tmp_path / "summary.md").read_text().count("| ok |") == trials
    # Each trial's log file has its own plan table, not the later trials' too.
    assert all((tmp_path / str(trial) / "train.log").read_text().count("Plans for") == 1 for trial in range(trials))
