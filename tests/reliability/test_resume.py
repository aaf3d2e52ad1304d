"""The main job resumes the checkpoints it writes, under every backend."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
from hydra.core.hydra_config import HydraConfig

from lightning_offload.train import train
from tests.test_train import SHORT_RUN, compose_config

FIRST_STEPS, TOTAL_STEPS = 3, 5
# Tiny runs; the planner's pre-flight check is tested elsewhere (its host-RAM check depends on the machine's load).
RUN = [*SHORT_RUN, "trainer.val_check_interval=1.0", "trainer.limit_val_batches=1", "data.max_bytes=30000"]
STRATEGIES = {
    "device": ["strategy=auto", "strategy.backend=device"],
    "gpu_8bit": ["strategy=gpu_8bit", "+strategy.check_memory=false"],
    "fsdp": ["strategy=fsdp", "+strategy.check_memory=false"],
    "host_adam": ["strategy=host_adam", "+strategy.check_memory=false", "strategy.bucket_numel=20000",
                  "strategy.chunk_numel=5000"],
    "deepspeed": ["strategy=deepspeed", "+strategy.check_memory=false"],
}


class _StartStep(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.step = trainer.global_step


@pytest.mark.parametrize("backend", sorted(STRATEGIES))
def test_the_main_job_resumes_its_own_checkpoint(tmp_path, backend: str) -> None:
    first = compose_config(tmp_path / "first", [*RUN, *STRATEGIES[backend], f"trainer.max_steps={FIRST_STEPS}"])
    HydraConfig.instance().set_config(first)
    train(first)
    checkpoint = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert checkpoint.exists()
    resumed = compose_config(tmp_path / "second", [*RUN, *STRATEGIES[backend], f"trainer.max_steps={TOTAL_STEPS}",
                                                   f"ckpt_path={checkpoint}"])
    HydraConfig.instance().set_config(resumed)
    start = _StartStep()
    train(resumed, extra_callbacks=[start])
    assert start.step == FIRST_STEPS


def test_the_main_job_resumes_from_the_command_line(tmp_path) -> None:
    def job(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "lightning_offload.train", *RUN, *STRATEGIES["device"],
                   f"hydra.run.dir={run_dir}", *overrides]
        return subprocess.run(command, capture_output=True, text=True, timeout=300)

    first = job(tmp_path / "A", f"trainer.max_steps={FIRST_STEPS}")
    assert first.returncode == 0, first.stderr[-3000:]
    second = job(tmp_path / "B", f"trainer.max_steps={TOTAL_STEPS}",
                 f"ckpt_path={tmp_path / 'A' / 'checkpoints' / 'last.ckpt'}")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Restored all states from the checkpoint" in second.stdout + second.stderr
