"""Ctrl+C and SLURM's requeue signal land between steps under engines that update parameters during backward: the
checkpoint Lightning's requeue handler writes is the one a save between the steps writes, and Ctrl+C stops after the
step (a second Ctrl+C stops inside it, and a checkpoint of that model says it is partly a step ahead)."""

from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment

from tests.conftest import TinyLM
from tests.test_repeated_runs import BACKENDS, seeded_fit

UPDATE_INSIDE_BACKWARD = ["gpu_8bit", "host_adam", "stream"]
SIGNALLED_STEP = 2


@pytest.fixture
def sigint_kept() -> Any:
    """Lightning ignores Ctrl+C while it shuts down an interrupted fit; the test process keeps its handler."""
    handler = signal.getsignal(signal.SIGINT)
    yield handler
    signal.signal(signal.SIGINT, handler)


@pytest.fixture
def slurm_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A SLURM job whose `scontrol requeue` only records that it was called."""
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'requeued'}\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{scontrol.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    return tmp_path / "requeued"


class SignalledInStep(TinyLM):
    """Sends itself `signum` (`times` times) in step `SIGNALLED_STEP`: inside its backward (`in_backward`), after
    the last block's gradients, or right after backward, before the optimizer step."""

    def __init__(self, signum: int, in_backward: bool, times: int = 1) -> None:
        super().__init__()
        self.signum, self.in_backward, self.times = signum, in_backward, times

    def _signal(self, *_: Any) -> None:
        for _ in range(self.times):
            os.kill(os.getpid(), self.signum)

    def _signal_in_backward(self, _module: Any, _args: Any, output: torch.Tensor) -> None:
        self._forward_hook.remove()
        output.register_hook(self._signal)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.in_backward and self.trainer.global_step == SIGNALLED_STEP:
            self._forward_hook = self.net.blocks[0].register_forward_hook(self._signal_in_backward)
        return super().training_step(batch, batch_idx)

    def on_after_backward(self) -> None:
        if not self.in_backward and self.trainer.global_step == SIGNALLED_STEP:
            self._signal()


class SaveAtStepStart(pl.Callback):
    """Saves a checkpoint at the start of the step after the signalled one: between steps, by the user's call."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        if trainer.global_step == SIGNALLED_STEP + 1:
            trainer.save_checkpoint(self.path)


def resumed_losses(backend: str, checkpoint: Path) -> list[float]:
    return seeded_fit(backend, num_batches=8, max_steps=6, ckpt_path=str(checkpoint))[0].losses


@pytest.mark.parametrize("in_backward", [False, True], ids=["after_backward", "in_backward"])
@pytest.mark.parametrize("backend", UPDATE_INSIDE_BACKWARD)
def test_a_requeue_signal_inside_a_step_checkpoints_between_steps(
        backend: str, in_backward: bool, slurm_job: Path, tmp_path: Path) -> None:
    between_steps = tmp_path / "between_steps.ckpt"
    module = SignalledInStep(int(signal.SIGUSR1), in_backward)
    seeded_fit(backend, module=module, num_batches=8, max_steps=6, default_root_dir=tmp_path,
               plugins=[SLURMEnvironment(auto_requeue=True)], callbacks=[SaveAtStepStart(between_steps)])
    assert slurm_job.read_text().split() == ["requeue", "1234"]
    [requeue_checkpoint] = tmp_path.glob("hpc_ckpt_*")
    after_requeue = resumed_losses(backend, requeue_checkpoint)
    assert len(after_requeue) == 6 - (SIGNALLED_STEP + 1)
    assert after_requeue == resumed_losses(backend, between_steps)


def test_engines_that_update_after_backward_handle_the_requeue_signal_where_it_lands(
        slurm_job: Path, tmp_path: Path) -> None:
    # As under `strategy="auto"`: the checkpoint is of the model before the step, with the step not counted.
    module = SignalledInStep(int(signal.SIGUSR1), in_backward=False)
    seeded_fit("device", module=module, num_batches=8, max_steps=6, default_root_dir=tmp_path,
               plugins=[SLURMEnvironment(auto_requeue=True)])
    [requeue_checkpoint] = tmp_path.glob("hpc_ckpt_*")
    assert torch.load(requeue_checkpoint, weights_only=False)["global_step"] == SIGNALLED_STEP


@pytest.mark.parametrize("backend", UPDATE_INSIDE_BACKWARD)
def test_ctrl_c_inside_a_step_stops_after_it(backend: str, sigint_kept: Any, capfd: pytest.CaptureFixture) -> None:
    stopped = SignalledInStep(int(signal.SIGINT), in_backward=True)
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown ends with `sys.exit(1)`
        seeded_fit(backend, module=stopped, num_batches=8, max_steps=6)
    assert "takes effect when the step ends" in capfd.readouterr().err
    assert stopped.trainer.global_step == SIGNALLED_STEP + 1
    uninterrupted, _ = seeded_fit(backend, num_batches=8, max_steps=SIGNALLED_STEP + 1)
    assert _equal(_weights(stopped), _weights(uninterrupted))


@pytest.mark.parametrize("backend", UPDATE_INSIDE_BACKWARD)
def test_a_second_ctrl_c_stops_inside_the_step_and_its_checkpoint_says_so(
        backend: str, sigint_kept: Any, tmp_path: Path) -> None:
    stopped = SignalledInStep(int(signal.SIGINT), in_backward=True, times=2)
    with pytest.raises(SystemExit):
        seeded_fit(backend, module=stopped, num_batches=8, max_steps=6)
    assert stopped.trainer.global_step == SIGNALLED_STEP
    with pytest.warns(UserWarning, match="partly a step ahead of its step counter"):
        stopped.trainer.save_checkpoint(tmp_path / "stopped.ckpt")


def test_ctrl_c_stops_at_once_where_the_engine_updates_after_backward(sigint_kept: Any, tmp_path: Path) -> None:
    stopped = SignalledInStep(int(signal.SIGINT), in_backward=True)
    with pytest.raises(SystemExit):
        seeded_fit("device", module=stopped, num_batches=8, max_steps=6)
    assert stopped.trainer.global_step == SIGNALLED_STEP
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stopped.trainer.save_checkpoint(tmp_path / "stopped.ckpt")
    assert not [w for w in caught if "step ahead" in str(w.message)]


@pytest.mark.parametrize("backend", ["device", *UPDATE_INSIDE_BACKWARD])
def test_a_fit_gives_back_the_handlers_it_found(backend: str, sigint_kept: Any) -> None:
    seeded_fit(backend, max_steps=2)
    assert signal.getsignal(signal.SIGINT) is sigint_kept


def _weights(module: TinyLM) -> dict[str, torch.Tensor]:
    return {name: tensor.float() for name, tensor in module.state_dict().items()}


def _equal(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
