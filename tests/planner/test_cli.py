"""`lightning-offload plan`: the table for a model config on a machine given by overrides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from lightning_offload.models import CausalLM
from lightning_offload.planner.cli import plan_from_config
from lightning_offload.train import train
from tests.planner.test_strategy_planning import prefer
from tests.test_train import SHORT_RUN, compose_config


def test_plans_a_model_config_for_another_machine(tmp_path) -> None:
    command = [sys.executable, "-m", "lightning_offload", "plan", "model=llama_1b", "data=random_tokens",
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
    command = [sys.executable, "-m", "lightning_offload", "plan", "machine.ceilings=h1000", f"hydra.run.dir={tmp_path}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Unknown `machine.ceilings=h1000`" in done.stderr


def test_the_former_module_command_warns_and_still_plans(tmp_path) -> None:
    command = [sys.executable, "-m", "lightning_offload.plan", "machine.ceilings=h1000", f"hydra.run.dir={tmp_path}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert "`python -m lightning_offload.plan` is deprecated" in done.stderr
    assert done.returncode == 2 and "Unknown `machine.ceilings=h1000`" in done.stderr


def test_levers_are_pinned_with_the_training_apps_config_groups(tmp_path) -> None:
    command = [sys.executable, "-m", "lightning_offload", "plan", "model=llama_1b", "data=random_tokens",
               "machine.gpu_memory_gib=80", "machine.host_memory_gib=125", "machine.ceilings=h100",
               "strategy=fsdp", "optimizer=adamw", "activation_checkpointing=every_k",
               "activation_checkpointing.every_k=4",
               f"hydra.run.dir={tmp_path}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    chosen = next(line for line in done.stdout.splitlines() if "->" in line)
    assert "fsdp + adamw + activation_checkpointing=every_4" in chosen


def test_the_plan_command_checkpoints_only_the_blocks_memory_needs_and_a_pinned_count_plans_the_same() -> None:
    machine = ["model=llama_1b", "data=random_tokens", "machine.gpu_memory_gib=24", "machine.host_memory_gib=64",
               "machine.ceilings=h100", "strategy=gpu_8bit", "optimizer=adamw8bit"]
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="lightning_offload.conf", version_base="1.3"):
        auto = plan_from_config(compose(config_name="plan", overrides=machine))
        chosen = auto.chosen.plan
        assert chosen.checkpointing == "first_n" and 0 < chosen.first_n < auto.stats.blocks
        assert any(line.startswith(f"->{chosen}") for line in auto.table().splitlines())
        pinned = plan_from_config(compose(config_name="plan", overrides=[
            *machine, "activation_checkpointing=first_n", f"activation_checkpointing.first_n={chosen.first_n}"]))
        sized = plan_from_config(compose(config_name="plan", overrides=[*machine, "activation_checkpointing=first_n"]))
    assert pinned.chosen.plan == sized.chosen.plan == chosen


def test_the_plan_command_previews_the_pinned_count_training_checkpoints(tmp_path) -> None:
    preview, trained = preview_and_training_plans(tmp_path, ["model.network.n_layers=3",
                                                             "activation_checkpointing=first_n",
                                                             "activation_checkpointing.first_n=2"])
    assert preview.chosen.plan == trained.chosen.plan and trained.chosen.plan.first_n == 2


class KeepPlan(pl.Callback):
    """Keeps the plan report the strategy trained with."""

    report = None

    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.report = trainer.strategy.plan_report


def preview_and_training_plans(tmp_path, overrides: list[str]) -> tuple[Any, Any]:
    """The plan command's report and the report training made, for the same overrides of a one-step run."""
    overrides = [*SHORT_RUN, "trainer.max_steps=1", "trainer.limit_val_batches=0", *overrides]
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="lightning_offload.conf", version_base="1.3"):
        preview = plan_from_config(compose(config_name="plan", overrides=overrides))
    kept = KeepPlan()
    cfg = compose_config(tmp_path, overrides)
    HydraConfig.instance().set_config(cfg)
    train(cfg, extra_callbacks=[kept])
    return preview, kept.report


@pytest.mark.parametrize("trainer_overrides", [
    ["trainer.gradient_clip_val=0.5", "trainer.accumulate_grad_batches=2"],
    ["trainer.gradient_clip_val=null"],
])
def test_the_plan_command_previews_the_plan_training_picks(tmp_path, trainer_overrides) -> None:
    preview, trained = preview_and_training_plans(tmp_path, trainer_overrides)
    assert preview.chosen.plan == trained.chosen.plan
    assert (preview.accumulate, preview.holds_gradients) == (trained.accumulate, trained.holds_gradients)
    assert preview.stats == trained.stats
    clipping = "trainer.gradient_clip_val=0.5" in trainer_overrides
    assert preview.holds_gradients is clipping and preview.accumulate == (2 if clipping else 1)


class ReadsGradients(pl.Callback):
    """Reads the gradients before each optimizer step: `host_adam` has none there."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule, optimizer) -> None:
        assert any(p.grad is not None for p in module.parameters())


class LogsGradNorm(CausalLM):
    """The config's model with a hook that reads the gradients before each optimizer step."""

    def on_before_optimizer_step(self, optimizer) -> None:
        from lightning.pytorch.utilities import grad_norm

        self.log_dict(grad_norm(self, norm_type=2))


# (overrides that add what `host_adam` cannot run, or none; the backend both pick where `host_adam` is fastest)
READERS = {
    "nothing": ([], "host_adam"),
    "a callback": ([f"+callbacks.reads_gradients._target_={__name__}.ReadsGradients"], "device"),
    "a module hook": ([f"model._target_={__name__}.LogsGradNorm"], "device"),
}


@pytest.mark.parametrize("reader", list(READERS))
def test_the_plan_command_sees_the_callbacks_and_hooks_training_sees(monkeypatch, tmp_path, reader) -> None:
    added, backend = READERS[reader]
    prefer(monkeypatch, "host_adam", "device")
    preview, trained = preview_and_training_plans(tmp_path, added)
    assert preview.chosen.plan == trained.chosen.plan and trained.chosen.plan.backend == backend
    assert preview.left_out == trained.left_out and ("host_adam" in preview.left_out) is bool(added)
    assert preview.needs.gradient_hooks == trained.needs.gradient_hooks


@pytest.mark.parametrize("strategy", ["auto", "deepspeed", "fsdp", "gpu_8bit", "host_adam", "stream"])
def test_the_main_jobs_machine_keys_are_the_strategys_budgets(tmp_path, strategy) -> None:
    from hydra.utils import instantiate

    cfg = compose_config(tmp_path, [f"strategy={strategy}", "machine.gpu_memory_gib=20", "machine.host_memory_gib=48"])
    built = instantiate(cfg.strategy)
    assert (built.max_gpu_memory_gib, built.max_host_memory_gib) == (20, 48)
    assert instantiate(compose_config(tmp_path, [f"strategy={strategy}"]).strategy).max_host_memory_gib is None


def test_a_disk_given_adds_its_columns_and_the_plans_that_keep_state_there(tmp_path) -> None:
    swap = tmp_path / "swap"
    swap.mkdir()
    command = [sys.executable, "-m", "lightning_offload", "plan", "model=llama_1b", "data=random_tokens",
               "machine.gpu_memory_gib=80", "machine.host_memory_gib=16", "machine.ceilings=h100",
               "strategy=deepspeed_nvme", "strategy.offload_device=null", "strategy.nvme_state=null",
               f"strategy.nvme_path={swap}", "trainer.gradient_clip_val=null", "rows=30", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "LIGHTNING_OFFLOAD_CACHE": str(tmp_path / "cache")})
    # The table is printed whether or not a plan fits this little host RAM; the exit status says which.
    assert done.returncode == (0 if "Chosen:" in done.stdout else 1), done.stderr[-3000:]
    out = " ".join(done.stdout.split())
    assert "disk GiB" in out and "written GB/step" in out and "O_DIRECT" in out
    assert "parameters on NVMe" in out and "optimizer state on NVMe" in out
    assert list(swap.iterdir()) == []  # the probe leaves nothing behind


def test_the_h100_preset_is_the_measured_machine() -> None:
    import yaml

    from lightning_offload.planner import Ceilings, Machine
    from lightning_offload.planner.cli import MACHINE_PRESETS

    conf = Path(__file__).resolve().parents[2] / "conf" / "machine"
    assert {file.stem for file in conf.glob("*.yaml")} == set(MACHINE_PRESETS)
    h100 = yaml.safe_load((conf / "h100_80gb.yaml").read_text())
    assert Ceilings(**h100["ceilings"]) == Ceilings() and h100["gpu_memory_gib"] == Machine().gpu_memory_gib
    for preset in MACHINE_PRESETS:  # every preset's rates are the planner's fields, and slower than the H100's
        ceilings = Ceilings(**yaml.safe_load((conf / f"{preset}.yaml").read_text())["ceilings"])
        assert ceilings.matmul_tflops <= Ceilings().matmul_tflops


def plan_of(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="lightning_offload.conf", version_base="1.3"):
        return plan_from_config(compose(config_name="plan", overrides=overrides))


def test_a_transformers_config_json_plans_as_the_yaml_model_it_describes(tmp_path) -> None:
    import yaml
    from transformers import LlamaConfig

    conf = Path(__file__).resolve().parents[2] / "conf" / "model" / "llama_1b.yaml"
    LlamaConfig(**yaml.safe_load(conf.read_text())["network"]).to_json_file(tmp_path / "config.json")
    machine = ["data=random_tokens", "machine=rtx4090", "machine.host_memory_gib=64"]
    from_json = plan_of(["model=hf", f"model.config={tmp_path / 'config.json'}", *machine])
    from_yaml = plan_of(["model=llama_1b", *machine])
    assert from_json.stats == from_yaml.stats and from_json.chosen.plan == from_yaml.chosen.plan
    # The folder holding config.json names it too; its keys can be overridden like a YAML model's.
    smaller = plan_of(["model=hf", f"model.config={tmp_path}", "+model.network.num_hidden_layers=4", *machine])
    assert smaller.stats.blocks == 4 and smaller.stats.parameters < from_json.stats.parameters

