"""`python -m lightning_offload.plan`: the table for a model config on a machine given by overrides."""

from __future__ import annotations

import os
import subprocess
import sys


def test_plans_a_model_config_for_another_machine(tmp_path) -> None:
    command = [sys.executable, "-m", "lightning_offload.plan", "model=llama_1b", "data=random_tokens",
               "machine.gpu_memory_gib=24", "machine.host_memory_gib=64", "machine.ceilings=h100",
               f"hydra.run.dir={tmp_path}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "1.50B parameters, 8192 tokens/step on 24 GiB GPU, 64 GiB host RAM" in out.replace("\n", " ") or \
        "1.50B parameters" in out
    assert "->" in out and "Chosen:" in out
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.stdout == out  # deterministic for a machine given by overrides


def test_a_typo_in_a_value_is_refused_with_the_allowed_ones(tmp_path) -> None:
    command = [sys.executable, "-m", "lightning_offload.plan", "machine.ceilings=h1000", f"hydra.run.dir={tmp_path}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Unknown `machine.ceilings=h1000`" in done.stderr


def test_levers_are_pinned_with_the_training_apps_config_groups(tmp_path) -> None:
    command = [sys.executable, "-m", "lightning_offload.plan", "model=llama_1b", "data=random_tokens",
               "machine.gpu_memory_gib=80", "machine.host_memory_gib=125", "machine.ceilings=h100",
               "backend=fsdp", "optimizer=adamw", "checkpointing=every_k", "checkpointing.every_k=4",
               f"hydra.run.dir={tmp_path}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    chosen = next(line for line in done.stdout.splitlines() if "->" in line)
    assert "fsdp + adamw + checkpointing=every_4" in chosen


def test_a_disk_given_adds_its_columns_and_the_plans_that_keep_state_there(tmp_path) -> None:
    swap = tmp_path / "swap"
    swap.mkdir()
    command = [sys.executable, "-m", "lightning_offload.plan", "model=llama_1b", "data=random_tokens",
               "machine.gpu_memory_gib=80", "machine.host_memory_gib=16", "machine.ceilings=h100",
               "backend=deepspeed", f"nvme_path={swap}", "rows=30", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "LIGHTNING_OFFLOAD_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr[-3000:]
    out = " ".join(done.stdout.split())
    assert "disk GiB" in out and "written GB/step" in out and "O_DIRECT" in out
    assert "parameters on NVMe" in out and "optimizer state on NVMe" in out
    assert list(swap.iterdir()) == []  # the probe leaves nothing behind
