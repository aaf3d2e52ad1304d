"""The main job: Hydra config composition, a short real run, the command line, and its errors."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from lightning_offload.train import build_loggers, default_precision, train

SHORT_RUN = ["trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=2",
             "data.max_bytes=100000", "data.batch_size=4", "data.seq_len=32", "model.network.d_model=32",
             "model.network.n_layers=1", "trainer.enable_progress_bar=false",
             "trainer.log_every_n_steps=2"]


@pytest.mark.parametrize(("gpu", "capability", "precision"), [
    (True, (7, 5), "16-mixed"),  # a T4: bf16 only emulated
    (True, (8, 0), "bf16-mixed"),
    (False, None, "32-true"),
])
def test_the_default_precision_is_one_the_gpu_computes_natively(monkeypatch: pytest.MonkeyPatch, gpu: bool,
                                                                 capability: tuple[int, int] | None,
                                                                 precision: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert default_precision() == precision


def compose_config(tmp_path: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="lightning_offload.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
    return cfg


def tiny_llama_config(folder: Path) -> Path:
    """A transformers config.json of a ~0.1M-parameter Llama, for `model=hf`."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512).to_json_file(folder / "config.json")
    return folder / "config.json"


CONF = Path(__file__).resolve().parents[1] / "conf"
OPTIONS = [(folder.name, file.stem) for folder in sorted(CONF.iterdir()) if folder.is_dir()
           for file in sorted(folder.glob("*.yaml"))]


@pytest.mark.parametrize("group,option", OPTIONS)
def test_every_config_option_composes_and_instantiates(tmp_path, group: str, option: str) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    needs_a_file = [f"model.config={tiny_llama_config(tmp_path)}"] if (group, option) == ("model", "hf") else []
    cfg = compose_config(tmp_path, [f"{group}={option}", *needs_a_file])
    HydraConfig.instance().set_config(cfg)
    if group == "logger":
        try:
            assert build_loggers(cfg.logger)
        except ModuleNotFoundError as missing:  # an optional logger's package: named with the extra to install
            assert f"pip install 'lightning_offload[{option}]'" in str(missing)
    elif group == "callbacks" or "_target_" in cfg.get(group, {}):  # `experiment` options are global overrides
        instantiate(cfg[group])
    instantiate(cfg.strategy)


@pytest.mark.parametrize("strategy", ["auto", "gpu_8bit", "host_adam", "fsdp", "stream"])
def test_compiled_blocks_are_one_override(tmp_path, strategy: str) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    cfg = compose_config(tmp_path, [f"strategy={strategy}", "strategy.compile_blocks=true"])
    HydraConfig.instance().set_config(cfg)
    assert instantiate(cfg.strategy).compile_blocks is True


@pytest.mark.parametrize("override,message", [
    ("optimizer.nmae=adamw", "Key 'nmae' not in 'OptimizerChoice'"),
    ("activation_checkpointing.polcy=full", "Key 'polcy' not in 'CheckpointingConfig'"),
    ("optimizer=adamw9", "Could not find 'optimizer/adamw9'"),
])
def test_typos_in_keys_and_options_fail_at_composition(tmp_path, override: str, message: str) -> None:
    with pytest.raises(Exception) as error:
        compose_config(tmp_path, [override])
    assert message in str(error.value) + str(error.value.__cause__)


@pytest.mark.parametrize("old,new", [
    ("strategy=gpu_only", "strategy=gpu_8bit"), ("strategy=deepspeed_cpu", "strategy=deepspeed"),
    ("strategy=fsdp_cpu", "strategy=fsdp"), ("strategy=single_gpu_offload", "strategy=auto"),
    ("checkpointing=every_k", "activation_checkpointing=every_k"),
])
def test_former_config_names_compose_as_the_new_ones_and_warn(tmp_path, old: str, new: str) -> None:
    import warnings

    from omegaconf import OmegaConf

    from lightning_offload.config import warn_deprecated_names

    former, current = compose_config(tmp_path, [old]), compose_config(tmp_path, [new])
    for group in ("strategy", "activation_checkpointing"):
        assert OmegaConf.to_container(former[group]) == OmegaConf.to_container(current[group])
    with pytest.warns(FutureWarning, match=f"`{old}` is deprecated and will be removed in the next release; "
                                           f"use `{new}`"):
        warn_deprecated_names(former)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_deprecated_names(current)


def test_a_bad_value_names_the_allowed_ones(tmp_path) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    cfg = compose_config(tmp_path, ["activation_checkpointing.policy=fulll"])
    HydraConfig.instance().set_config(cfg)
    with pytest.raises(Exception, match=r"Unknown activation checkpointing policy 'fulll'. Choose one of"):
        instantiate(cfg.strategy)


def test_short_run_leaves_checkpoint_and_metrics(tmp_path) -> None:
    from hydra.core.hydra_config import HydraConfig

    cfg = compose_config(tmp_path, SHORT_RUN)
    HydraConfig.instance().set_config(cfg)
    metrics = train(cfg)
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    assert any(row["train/loss"] for row in rows) and any(row["val/perplexity"] for row in rows)
    assert metrics["val/perplexity"] > 1


def test_command_line_run_and_unknown_key(tmp_path) -> None:
    command = [sys.executable, "-m", "lightning_offload.train", f"hydra.run.dir={tmp_path}", *SHORT_RUN]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    # The planner's table and choice are logged, then the backend it chose.
    assert "Plans for" in output and "Chosen: device" in output and "offload` on cpu: no offload" in output
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()

    typo = subprocess.run([*command, "trainer.max_stepz=3"], capture_output=True, text=True, timeout=300)
    assert typo.returncode != 0 and "Key 'max_stepz' is not in struct" in typo.stderr


def test_sweep_from_command_line_writes_one_row_per_job(tmp_path) -> None:
    command = [sys.executable, "-m", "lightning_offload.train", "-m", f"hydra.sweep.dir={tmp_path}",
               "optimizer=adamw,adamw8bit", "activation_checkpointing=none,full", *SHORT_RUN]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert len(rows) == 4 and all(row["status"] == "ok" and float(row["tokens_per_s"]) > 0 for row in rows)
    combos = {tuple(o for o in row["overrides"].split() if o.split("=")[0] in ("optimizer", "activation_checkpointing"))
              for row in rows}
    assert len(combos) == 4
    assert (tmp_path / "summary.md").read_text().count("| ok |") == 4


def test_a_transformers_config_json_trains(tmp_path) -> None:
    from hydra.core.hydra_config import HydraConfig

    config = tiny_llama_config(tmp_path)
    cfg = compose_config(tmp_path, ["model=hf", f"model.config={config}", "data=random_tokens", "data.seq_len=16",
                                    "data.batch_size=2", "data.num_batches=4", "trainer.max_steps=2", "trainer.val_check_interval=2",
                                    "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false"])
    HydraConfig.instance().set_config(cfg)
    metrics = train(cfg)
    # Random tokens below the file's vocabulary: the untrained loss is about log(vocab_size).
    assert cfg.data.vocab_size == 512 and abs(metrics["val/loss"] - math.log(512)) < 1


def test_two_loggers_receive_the_same_metrics_the_config_and_the_plan(tmp_path) -> None:
    from hydra.core.hydra_config import HydraConfig
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = compose_config(tmp_path, [*SHORT_RUN, "logger=many"])
    HydraConfig.instance().set_config(cfg)
    train(cfg)
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    from_csv = {(name, int(row["step"]), float(value)) for row in rows for name, value in row.items()
                if name not in ("step", "epoch") and value}
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    from_tensorboard = {(name, event.step, event.value) for name in events.Tags()["scalars"] if name != "epoch"
                        for event in events.Scalars(name)}
    assert {name for name, _, _ in from_csv} >= {"train/loss", "val/perplexity"}
    # The same names, steps and values (TensorBoard keeps float32).
    assert {(n, s, round(v, 3)) for n, s, v in from_csv} == {(n, s, round(v, 3)) for n, s, v in from_tensorboard}

    # Both hold the resolved config, the module's and the plan's hyperparameters.
    for folder in ("csv", "tensorboard"):
        hparams = yaml.safe_load((tmp_path / folder / "hparams.yaml").read_text())
        assert hparams["plan/backend"] == "device" and hparams["optimized_metric"] == cfg.optimized_metric
        assert hparams["trainer"]["max_steps"] == cfg.trainer.max_steps and hparams["lr"] == cfg.model.lr


def test_the_plan_table_reaches_the_runs_log_file(tmp_path) -> None:
    command = [sys.executable, "-m", "lightning_offload.train", f"hydra.run.dir={tmp_path}", *SHORT_RUN,
               "trainer.max_steps=2", "trainer.limit_val_batches=0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run_log = (tmp_path / "train.log").read_text()
    assert "Plans for" in run_log and "Chosen: device" in run_log
    # Once on the console: the run's log file is not a second console handler.
    assert (done.stdout + done.stderr).count("Plans for") == 1
