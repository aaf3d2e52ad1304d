"""`lightning-offload <command>` (run as `python -m lightning_offload`): each subcommand on tiny inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from lightning_offload.cli import BAD_CONFIG, NOTHING_FITS, PLAN_FITS
from tests.test_train import SHORT_RUN

ROOT = Path(__file__).resolve().parents[1]
A_GPU_MACHINE = ["model=llama_1b", "data=random_tokens", "machine=h100_80gb", "machine.host_memory_gib=64"]


def command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # Run from an empty folder with this checkout first on the path: nothing may be written beside the command.
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "lightning_offload", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=env)


def test_train_takes_hydra_overrides(tmp_path) -> None:
    done = command("train", f"hydra.run.dir={tmp_path / 'run'}", *SHORT_RUN, "trainer.max_steps=2",
                   "trainer.limit_val_batches=0", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists() and (tmp_path / "run" / "metrics.json").is_file()


def test_planning_for_a_gpu_without_one_needs_it_named(tmp_path) -> None:
    unnamed = command("plan", "model=llama_1b", "data=random_tokens", "machine.gpu_memory_gib=24", cwd=tmp_path)
    assert unnamed.returncode == BAD_CONFIG and "machine=h100_80gb,a100_80gb,a6000,rtx4090" in unnamed.stderr
    named = command("plan", "--json", "model=llama_1b", "data=random_tokens", "machine=rtx4090",
                    "machine.gpu_memory_gib=20", "machine.host_memory_gib=64", cwd=tmp_path)
    assert named.returncode == PLAN_FITS, named.stderr[-3000:]
    report = json.loads(named.stdout)
    assert report["device"].startswith("NVIDIA GeForce RTX 4090") and report["machine"].startswith("20 GiB GPU")


def test_plan_exit_statuses_json_and_no_outputs_folder(tmp_path) -> None:
    fits = command("plan", "--json", *A_GPU_MACHINE, cwd=tmp_path)
    assert fits.returncode == PLAN_FITS, fits.stderr[-3000:]
    report = json.loads(fits.stdout)
    assert report["chosen"]["fits"] and report["error"] is None and report["parameters"] > 1e9
    too_small = command("plan", *A_GPU_MACHINE, "machine.gpu_memory_gib=1", "machine.host_memory_gib=1", cwd=tmp_path)
    assert too_small.returncode == NOTHING_FITS and "fits" in too_small.stdout
    typo = command("plan", *A_GPU_MACHINE, "machine.ceilings=h1000", cwd=tmp_path)
    assert typo.returncode == BAD_CONFIG and "Unknown `machine.ceilings=h1000`" in typo.stderr
    assert list(tmp_path.iterdir()) == []


def test_plan_takes_a_transformers_config_json(tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512)
    config.to_json_file(tmp_path / "config.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    done = command("plan", "--json", "model=hf", f"model.config={tmp_path / 'config.json'}", "data=random_tokens",
                   "data.seq_len=32", cwd=empty)
    assert done.returncode == PLAN_FITS, done.stderr[-3000:]
    with torch.device("meta"):
        parameters = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert json.loads(done.stdout)["parameters"] == parameters and list(empty.iterdir()) == []
    for missing in ([], [f"model.config={tmp_path / 'absent.json'}"]):
        refused = command("plan", "model=hf", *missing, "data=random_tokens", cwd=empty)
        assert refused.returncode == BAD_CONFIG and "model.config=" in refused.stderr, refused.stderr[-3000:]
        assert "Traceback" not in refused.stderr


def test_consolidate_and_an_unknown_command(tmp_path) -> None:
    checkpoint = tmp_path / "model.ckpt"
    weights = {"model.layer.weight": torch.randn(3, 2), "model.layer.bias": torch.randn(3)}
    torch.save({"state_dict": weights}, checkpoint)
    done = command("consolidate", str(checkpoint), str(tmp_path / "plain.pt"), "--prefix", "model.", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    plain = torch.load(tmp_path / "plain.pt")
    assert plain.keys() == {"layer.weight", "layer.bias"}
    assert all(torch.equal(plain[name], weights["model." + name]) for name in plain)
    unknown = command("trian", cwd=tmp_path)
    assert unknown.returncode == BAD_CONFIG and "lightning-offload train" in unknown.stderr


def test_export_runs_the_exporters_command_line(tmp_path) -> None:
    done = command("export", str(tmp_path / "missing.ckpt"), str(tmp_path / "out"), "--config", str(tmp_path),
                   cwd=tmp_path)
    # The exporter's own argument handling and its refusal of a folder that holds no model config.
    assert done.returncode != 0 and "Should have a `model_type` key in its config.json" in done.stderr
    usage = command("export", "--help", cwd=tmp_path)
    assert usage.returncode == 0 and "usage: lightning-offload export" in usage.stdout


def test_the_former_train_script_warns_and_runs_the_app(tmp_path) -> None:
    code = "import sys; from lightning_offload.cli import deprecated_train; sys.argv = ['x', '--help']; deprecated_train()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "`lightning-offload-train` is deprecated" in done.stderr and "trainer" in done.stdout
