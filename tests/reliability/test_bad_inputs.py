"""Bad input gets one clear message naming the problem and the fix, before anything is built."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig

from lightning_offload.data import StdlibText
from lightning_offload.train import train
from tests.test_train import SHORT_RUN, compose_config


@pytest.mark.parametrize("override,message", [
    ("trainer.max_steps=abc", r"`trainer.max_steps` must be an integer >= -1, got 'abc' \(e.g. trainer.max_steps="),
    ("data.batch_size=0", r"`data.batch_size` must be an integer >= 1, got 0"),
    ("trainer.accumulate_grad_batches=0", r"`trainer.accumulate_grad_batches` must be an integer >= 1, got 0"),
    ("trainer.gradient_clip_val=-1", r"`trainer.gradient_clip_val` must be null or a number >= 0.0, got -1"),
    ("data.val_fraction=1.5", r"`data.val_fraction` must be a number between 0 and 1, got 1.5"),
    ("data.seq_len=true", r"`data.seq_len` must be an integer >= 1, got True"),
])
def test_bad_trainer_and_data_values_are_refused_by_name(tmp_path, override: str, message: str) -> None:
    cfg = compose_config(tmp_path, [*SHORT_RUN, override])
    HydraConfig.instance().set_config(cfg)
    with pytest.raises(ValueError, match=message):
        train(cfg)


def test_too_little_text_for_one_batch_is_refused_with_the_size_needed() -> None:
    data = StdlibText(max_bytes=100, seq_len=128, batch_size=16)
    with pytest.raises(ValueError, match=r"`max_bytes=100` holds 0 training .* Raise `max_bytes` to at least \d+"):
        data.setup("fit")


def test_the_size_it_names_is_enough() -> None:
    data = StdlibText(max_bytes=100, seq_len=16, batch_size=2)
    with pytest.raises(ValueError) as refused:
        data.setup("fit")
    needed = int(str(refused.value).split("at least ")[1].split(",")[0])
    enough = StdlibText(max_bytes=needed, seq_len=16, batch_size=2)
    enough.setup("fit")
    assert len(enough.train_dataloader()) >= 1 and len(enough.val_dataloader()) >= 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_output_folder_is_refused(tmp_path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    cfg = compose_config(locked / "run", SHORT_RUN)
    HydraConfig.instance().set_config(cfg)
    with pytest.raises(PermissionError, match="cannot be written.*hydra.run.dir="):
        train(cfg)


def test_an_unwritable_output_folder_is_refused_even_as_root(tmp_path) -> None:
    file_in_the_way = tmp_path / "a_file"
    file_in_the_way.write_text("")
    cfg = compose_config(file_in_the_way / "run", SHORT_RUN)
    HydraConfig.instance().set_config(cfg)
    with pytest.raises(PermissionError, match="cannot be written.*hydra.run.dir="):
        train(cfg)


def test_an_unwritable_hydra_run_dir_is_refused_before_hydra_creates_it(tmp_path) -> None:
    file_in_the_way = tmp_path / "a_file"
    file_in_the_way.write_text("")
    run = subprocess.run([sys.executable, "-m", "lightning_offload.train", f"hydra.run.dir={file_in_the_way}/run"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    assert f"'{file_in_the_way}/run' cannot be written" in run.stderr and "hydra.run.dir=" in run.stderr


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_folder_nobody_can_create_is_refused_even_as_root() -> None:
    # Inside /proc mkdir fails for every user, root included, whom permission checks let through.
    run = subprocess.run([sys.executable, "-m", "lightning_offload", "train", "hydra.run.dir=/proc/run"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr and "FileNotFoundError" not in run.stderr
    assert "'/proc/run' cannot be written" in run.stderr and "hydra.run.dir=" in run.stderr


def test_an_unwritable_hydra_sweep_dir_is_refused_by_its_key(tmp_path) -> None:
    from omegaconf import OmegaConf

    from lightning_offload.config import OutputFolderCheck

    file_in_the_way = tmp_path / "a_file"
    file_in_the_way.write_text("")
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(file_in_the_way / "sweep")}}})
    with pytest.raises(SystemExit, match=r"cannot be written.*`hydra.sweep.dir="):
        OutputFolderCheck().on_multirun_start(config=config)


@pytest.mark.parametrize("options,message", [
    (dict(backend="deepspeed", pin_memory="yes please"), r"`pin_memory='yes please'` \(expected bool\)"),
    (dict(backend="host_adam", bucket_numel=1.5), r"`bucket_numel=1.5` \(expected int\)"),
    (dict(backend="fsdp", reshard_after_forward=None), r"`reshard_after_forward=None` \(expected bool\)"),
])
def test_strategy_options_of_the_wrong_type_are_refused_by_name(options, message: str) -> None:
    from lightning_offload import SingleGPUOffloadStrategy

    with pytest.raises(TypeError, match=rf"Wrong type for backend option\(s\): {message}"):
        SingleGPUOffloadStrategy(**options)


def test_strategy_options_of_the_right_type_are_accepted() -> None:
    from lightning_offload import SingleGPUOffloadStrategy

    strategy = SingleGPUOffloadStrategy(backend="host_adam", host_threads=None, gpu_state_blocks=3, pin_memory=False)
    assert strategy.backend.config.gpu_state_blocks == 3


def _truncate(file) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def test_a_truncated_engine_checkpoint_is_named(tmp_path) -> None:
    from lightning_offload.backends.host_adam import CHECKPOINT_FILE, read_checkpoint

    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    import torch

    torch.save({"format": 1, "arena": torch.ones(1000)}, folder / CHECKPOINT_FILE)
    _truncate(folder / CHECKPOINT_FILE)
    with pytest.raises(ValueError, match=rf"{CHECKPOINT_FILE}' is truncated or corrupt .* resume from an earlier"):
        read_checkpoint(folder)


def test_an_engine_checkpoint_of_another_format_is_refused_with_the_one_read(tmp_path) -> None:
    import torch

    from lightning_offload.backends.host_adam import CHECKPOINT_FILE, read_checkpoint

    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    torch.save({"format": "lightning_offload.host_adam/1", "arena": torch.ones(10)}, folder / CHECKPOINT_FILE)
    with pytest.raises(ValueError, match=r"has format 'lightning_offload.host_adam/1'; this version reads "
                                         r"'lightning_offload.host_adam/2'"):
        read_checkpoint(folder)


def test_a_truncated_single_file_checkpoint_is_named_on_resume(tmp_path) -> None:
    from lightning_offload import SingleGPUOffloadStrategy
    from tests.conftest import fit

    _, trainer = fit(SingleGPUOffloadStrategy(backend="device", check_memory=False), num_batches=2)
    checkpoint = tmp_path / "last.ckpt"
    trainer.save_checkpoint(checkpoint)
    _truncate(checkpoint)
    with pytest.raises(ValueError, match=r"last.ckpt' is truncated or corrupt .* resume from an earlier"):
        fit(SingleGPUOffloadStrategy(backend="device", check_memory=False), num_batches=4, ckpt_path=str(checkpoint))


def test_a_garbage_deepspeed_latest_file_is_named(tmp_path) -> None:
    from lightning_offload.backends.deepspeed import _refuse_other_world_size

    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "latest").write_bytes(b"\x00\xffgarbage")
    with pytest.raises(ValueError, match=r"is damaged: its `latest` file names .* Resume from an earlier"):
        _refuse_other_world_size(tmp_path, 1)


def test_a_module_with_nothing_to_train_is_refused_by_name() -> None:
    from lightning_offload import SingleGPUOffloadStrategy
    from tests.conftest import TinyLM, fit

    class FrozenLM(TinyLM):
        def configure_model(self) -> None:
            super().configure_model()
            self.net.requires_grad_(False)

    with pytest.raises(ValueError, match=r"`FrozenLM` has no trainable parameter .* Unfreeze"):
        fit(SingleGPUOffloadStrategy(backend="device", check_memory=False), module=FrozenLM(), num_batches=2)


def test_an_unsupported_precision_names_the_flag_and_the_choices() -> None:
    from lightning_offload import SingleGPUOffloadStrategy
    from tests.conftest import fit

    with pytest.raises(ValueError, match=r"cannot train with `DoublePrecision` \(precision '64-true'.*Pass "
                                         r"`precision='bf16-mixed'`"):
        fit(SingleGPUOffloadStrategy(backend="device", check_memory=False), precision="64-true", num_batches=2)


@pytest.mark.parametrize("field,value", [("gpu_memory_gib", -1), ("host_memory_gib", "lots"), ("gpu_memory_gib", None)])
def test_a_planner_machine_with_impossible_memory_is_refused_by_name(field: str, value) -> None:
    from lightning_offload.planner import Machine

    with pytest.raises(ValueError, match=rf"`machine.{field}` must be a number of GiB \(at least 0\), got"):
        Machine(**{field: value})


@pytest.mark.parametrize("matmul_tflops,reprobed", [(0.0, True), (-3.0, True), (12.5, False)])
def test_a_probe_cache_with_a_zero_rate_is_probed_again(tmp_path, monkeypatch, matmul_tflops, reprobed) -> None:
    import dataclasses
    import json

    import torch

    from lightning_offload.planner import cost
    from lightning_offload.planner.cache import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    cpu = torch.device("cpu")
    cached = dataclasses.replace(cost.Ceilings(), matmul_tflops=matmul_tflops)
    cost._cache_path(cpu).parent.mkdir(parents=True, exist_ok=True)
    cost._cache_path(cpu).write_text(json.dumps(dataclasses.asdict(cached)))
    probed = dataclasses.replace(cost.Ceilings(), matmul_tflops=7.0)
    monkeypatch.setattr(cost, "probe", lambda device: probed)
    assert cost.load_or_probe(cpu) == (probed if reprobed else cached)


@pytest.mark.parametrize("accumulate", [0, -2, 1.5])
def test_the_planner_refuses_an_impossible_accumulation(accumulate) -> None:
    from lightning_offload.planner import plan
    from tests.conftest import TinyLM

    with pytest.raises(ValueError, match=r"`accumulate` \(micro-batches per optimizer step\) must be an integer >= 1"):
        plan(TinyLM(), accumulate=accumulate)


def test_the_planner_refuses_an_unknown_backend_with_the_choices() -> None:
    from lightning_offload.planner import plan
    from tests.conftest import TinyLM

    with pytest.raises(ValueError, match=r"`backend='deepspeedd'` is unknown. Choose one of \['auto', .*'deepspeed'"):
        plan(TinyLM(), backend="deepspeedd")


def test_host_adam_names_frozen_parameters_given_to_the_optimizer() -> None:
    import torch

    from lightning_offload import SingleGPUOffloadStrategy
    from tests.conftest import TinyLM, fit

    class FrozenBlock(TinyLM):
        def configure_model(self) -> None:
            super().configure_model()
            self.net.blocks[0].requires_grad_(False)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    strategy = SingleGPUOffloadStrategy(backend="host_adam", check_memory=False, bucket_numel=3000, chunk_numel=700)
    with pytest.raises(ValueError, match=r"do not require gradients \(e.g. 'net.blocks.0.*Give the optimizer only"):
        fit(strategy, module=FrozenBlock(), num_batches=2)



def test_stream_names_a_weight_shared_by_two_blocks_and_the_fix() -> None:
    from lightning_offload import SingleGPUOffloadStrategy
    from tests.backends.test_fsdp import BlocksSharingAWeight
    from tests.conftest import fit

    strategy = SingleGPUOffloadStrategy(backend="stream", check_memory=False, block_classes=["Block"])
    with pytest.raises(ValueError, match=r"Blocks 'net.blocks.0' and 'net.blocks.1' share the parameter "
                                         r"net.blocks.0.proj.weight = net.blocks.1.proj.weight.*Give each block its "
                                         r"own weight, or .*`backend='fsdp'`"):
        fit(strategy, module=BlocksSharingAWeight(), precision="bf16-mixed", num_batches=2)
