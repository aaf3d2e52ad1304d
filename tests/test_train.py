"""The main job: Hydra config composition, a short real run, the command line, and its errors."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from lightning_offload.train import train

SHORT_RUN = ["trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=2",
             "data.max_bytes=100000", "data.batch_size=4", "data.seq_len=32", "model.network.d_model=32",
             "model.network.n_layers=1", "trainer.enable_progress_bar=false",
             "trainer.log_every_n_steps=2"]


def compose_config(tmp_path: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="lightning_offload.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
    return cfg


@pytest.mark.parametrize("group,option", [("model", "tiny_gpt"), ("model", "llama_1b"), ("data", "stdlib_text"),
                                          ("data", "random_tokens"), ("strategy", "single_gpu_offload"),
                                          ("strategy", "deepspeed_cpu")])
def test_every_config_option_composes_and_instantiates(tmp_path, group: str, option: str) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    cfg = compose_config(tmp_path, [f"{group}={option}"])
    HydraConfig.instance().set_config(cfg)
    instantiate(cfg[group])


def test_short_run_leaves_checkpoint_and_metrics(tmp_path) -> None:
    from hydra.core.hydra_config import HydraConfig

    cfg = compose_config(tmp_path, SHORT_RUN)
    HydraConfig.instance().set_config(cfg)
    metrics = train(cfg)
    assert (tmp_path / "checkpoints" / "last.ckpt" / "latest").is_file()
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    assert any(row["train/loss"] for row in rows) and any(row["val/perplexity"] for row in rows)
    assert metrics["val/perplexity"] > 1


def test_command_line_run_and_unknown_key(tmp_path) -> None:
    command = [sys.executable, "-m", "lightning_offload.train", f"hydra.run.dir={tmp_path}", *SHORT_RUN]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "single_gpu_offload` on cpu: DeepSpeed ZeRO-3" in done.stdout + done.stderr
    assert (tmp_path / "checkpoints" / "last.ckpt").is_dir()

    typo = subprocess.run([*command, "trainer.max_stepz=3"], capture_output=True, text=True, timeout=300)
    assert typo.returncode != 0 and "Key 'max_stepz' is not in struct" in typo.stderr
