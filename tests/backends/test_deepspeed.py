"""The `deepspeed` backend with state on disk (ZeRO-Infinity, DeepSpeed's async I/O op on the CPU accelerator), and
validating from its checkpoints."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import pytest

import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_offload import SingleGPUOffloadStrategy
from lightning_offload.models import TinyGPT
from lightning_offload.planner import PlanDoesNotFit, UnusableDisk
from tests.conftest import SEQ_LEN, VOCAB, TinyLM, fit


class WideLM(TinyLM):
    """TinyLM at width 256: its matrices' fp32 state (~6 MB) is above DeepSpeed's 1 MiB smallest swapped tensor, so
    the optimizer's state really goes to disk."""

    def configure_model(self) -> None:
        if self.net is None:
            with torch.random.fork_rng():
                torch.manual_seed(self.hparams.init_seed)
                self.net = TinyGPT(vocab_size=VOCAB, d_model=256, n_layers=2, n_heads=4, max_seq_len=SEQ_LEN)


@pytest.fixture(autouse=True, scope="module")
def _async_io() -> None:
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().create_op_builder("AsyncIOBuilder").is_compatible(verbose=False):
        pytest.skip("DeepSpeed's async I/O op needs libaio (`apt-get install libaio-dev`)")


def on_disk(folder: Path, **options) -> SingleGPUOffloadStrategy:
    # Swap buffers of 1M elements (the test models' largest parameter is 262K) instead of the default 2.5 GB, which
    # the planner counts: training runs skip it (the refusals below run it).
    options = {"check_memory": False, "nvme_state": "all", "nvme_buffer_numel": 2**20, **options}
    return SingleGPUOffloadStrategy(backend="deepspeed", offload_device="nvme", nvme_path=str(folder), **options)


def swapped_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_state_on_disk_trains_with_the_host_offload_arithmetic(tmp_path) -> None:
    # The same DeepSpeed CPU Adam steps the same fp32 partitions; only where they rest between uses differs, so the
    # losses are bitwise those of the host-memory run.
    in_host, _ = fit("single_gpu_offload_deepspeed", module=WideLM(lr=1e-3))
    swapped, trainer = fit(on_disk(tmp_path), module=WideLM(lr=1e-3))
    assert swapped.losses == in_host.losses
    assert swapped.losses[-1] < 0.9 * swapped.losses[0]
    # The matrices' fp32 master weights, Adam moments and gradients are in files: 16 bytes per element at least.
    matrices = sum(p.ds_numel for name, p in swapped.named_parameters() if p.ds_numel * 4 >= 2**20)
    assert swapped_bytes(tmp_path) >= 16 * matrices > 0
    assert "NVMe" in trainer.strategy.backend.describe()


def test_parameters_on_disk_resume_exactly(tmp_path) -> None:
    swap = tmp_path / "swap"
    swap.mkdir()
    uninterrupted, _ = fit(on_disk(swap, nvme_state="parameters"), module=WideLM(lr=1e-3, scheduler="step"),
                           max_epochs=2)
    first, trainer = fit(on_disk(swap, nvme_state="parameters"), module=WideLM(lr=1e-3, scheduler="step"),
                         max_epochs=1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed, _ = fit(on_disk(swap, nvme_state="parameters"), module=WideLM(lr=1e-3, scheduler="step"),
                     max_epochs=2, ckpt_path=str(tmp_path / "epoch1.ckpt"))
    assert first.losses + resumed.losses == uninterrupted.losses


def test_checkpoints_of_optimizer_state_on_disk_are_refused_and_warned_at_setup(tmp_path) -> None:
    # DeepSpeed would write a checkpoint whose fp32 weights are empty: refused rather than written unloadable.
    with pytest.warns(UserWarning, match="cannot save or resume with `nvme_state='optimizer'`"):
        _, trainer = fit(on_disk(tmp_path, nvme_state="optimizer"), module=WideLM(lr=1e-3), num_batches=1)
    with pytest.raises(RuntimeError, match="nvme_state='parameters'"):
        trainer.save_checkpoint(tmp_path / "last.ckpt")
    assert not (tmp_path / "last.ckpt").exists()
    _, in_host = fit("single_gpu_offload_deepspeed", module=WideLM(lr=1e-3), num_batches=1)
    in_host.save_checkpoint(tmp_path / "in_host.ckpt")
    with pytest.raises(RuntimeError, match="cannot save or resume"):
        fit(on_disk(tmp_path, nvme_state="optimizer"), module=WideLM(lr=1e-3), num_batches=1,
            ckpt_path=str(tmp_path / "in_host.ckpt"))


@contextlib.contextmanager
def mounted(target: Path, *args: str) -> Iterator[Path]:
    target.mkdir(exist_ok=True)
    if subprocess.run(["mount", *args, str(target)], capture_output=True).returncode != 0:
        pytest.skip(f"cannot mount ({' '.join(args)}) here")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def refusal(folder: Path, check_memory: bool = True) -> str:
    with pytest.raises((UnusableDisk, PlanDoesNotFit)) as error:
        fit(on_disk(folder, check_memory=check_memory), num_batches=1)
    return str(error.value)


def test_a_missing_folder_is_refused(tmp_path) -> None:
    assert "does not exist" in refusal(tmp_path / "missing")


def test_a_file_is_refused(tmp_path) -> None:
    (tmp_path / "file").write_text("")
    assert "is a file, not a folder" in refusal(tmp_path / "file")


def test_a_read_only_folder_is_refused(tmp_path) -> None:
    with mounted(tmp_path / "ro", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs") as folder:
        assert "is not writable" in refusal(folder)


def test_a_filesystem_without_o_direct_is_refused(tmp_path) -> None:
    with mounted(tmp_path / "ram", "-t", "ramfs", "ramfs") as folder:
        assert "without O_DIRECT" in refusal(folder)


def test_a_disk_too_small_is_refused_with_the_numbers(tmp_path) -> None:
    # A 256 KiB filesystem: the optimizer state of the test model (16 bytes x ~30K parameters) needs ~0.5 MiB. The
    # planner refuses it before the model is built.
    with mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=256k", "tmpfs") as folder:
        message = refusal(folder)
    assert "disk short by" in message and "GiB disk" in message


def test_without_the_planner_a_disk_too_small_for_the_optimizer_is_refused_before_it_is_written(tmp_path) -> None:
    with mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=256k", "tmpfs") as folder:
        with pytest.raises(UnusableDisk, match=r"has 0\.\d\d MiB free but the optimizer state of [\d,]+ parameters"):
            fit(on_disk(folder, nvme_state="optimizer"), num_batches=1)


class _NormedRegressor(pl.LightningModule):
    """Running statistics (persistent buffers) and a non-persistent buffer, which no checkpoint holds."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                       torch.nn.Linear(16, 1))
        self.register_buffer("scale", torch.tensor(2.0), persistent=False)

    def _loss(self, batch) -> torch.Tensor:
        inputs, targets = batch
        return torch.nn.functional.mse_loss(self.scale * self.net(inputs), targets)

    def training_step(self, batch, batch_idx) -> torch.Tensor:
        return self._loss(batch)

    def validation_step(self, batch, batch_idx) -> None:
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_validate_from_a_checkpoint_loads_its_weights_and_running_statistics(tmp_path) -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(32, 8, generator=generator)
    data = DataLoader(TensorDataset(inputs, inputs.sum(dim=1, keepdim=True)), batch_size=8)

    def trainer() -> pl.Trainer:
        return pl.Trainer(strategy=SingleGPUOffloadStrategy(backend="deepspeed"), accelerator="cpu", devices=1,
                          max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False)

    module, trained = _NormedRegressor(), trainer()
    trained.fit(module, data)
    in_memory = trained.validate(module, data, verbose=False)[0]["val_loss"]
    trained.save_checkpoint(tmp_path / "trained.ckpt")

    from_checkpoint = trainer().validate(_NormedRegressor(), data, ckpt_path=tmp_path / "trained.ckpt",
                                         verbose=False)[0]["val_loss"]
    untrained = trainer().validate(_NormedRegressor(), data, verbose=False)[0]["val_loss"]
    assert from_checkpoint == in_memory
    assert untrained != in_memory
