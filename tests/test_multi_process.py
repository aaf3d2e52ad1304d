"""`strategy="offload"` with two processes on the CPU (gloo), launched as Lightning launches a user's script.

The two-process fits run one after another in one launch of `multi_process_job.py` (a launch costs ~15 s of
imports on two cores); their world-size-1 references and the checkpoints moved between world sizes run in this
process. Every run sees the same global batches: 8 samples per step, 4 per rank at world size 2.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_offload import OffloadStrategy, consolidate
from lightning_offload.planner import Plan
from lightning_offload.planner.record import plan_of_state, saved_plan
from tests.conftest import TinyLM, fit
from tests.test_strategy import assert_losses_close

JOB = Path(__file__).with_name("multi_process_job.py")
ROOT = JOB.parents[1]
PER_RANK_BATCH, STEPS = 4, 8
# The two ranks' gradients are averaged by a reduce-scatter instead of being summed in one batch: the same math in
# another order. Measured over 8 steps: within 1e-7 relative in fp32; within 2e-5 with 8-bit AdamW, whose blocks
# are cut along each rank's shard. Clipping by one rank's gradient norm instead of the model's (a real pitfall for
# optimizers that step local shards) moves the 8-bit losses by 3e-3 by step 5, far outside both tolerances.
WORLD_SIZE_RTOL = 1e-4
EIGHT_BIT_WORLD_SIZE_RTOL = 3e-4
# Generous: two cold Python processes import torch, Lightning and DeepSpeed on two shared cores.
LAUNCH_TIMEOUT_S = 300
# Variables an earlier one-process fit in this process exported for DeepSpeed; a child that inherits LOCAL_RANK
# believes it was started by an external launcher and waits for peers that never come.
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


def launch_two_processes(out: Path, fits: list[dict]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    command = [sys.executable, str(JOB), "--devices", "2", "--batch-size", str(PER_RANK_BATCH),
               "--num-batches", str(STEPS), "--fits", json.dumps(fits), "--out", str(out)]
    # Its own session, so that a hang is ended together with the process Lightning's launcher started.
    process = subprocess.Popen(command, env=env, cwd=ROOT, start_new_session=True, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(command, process.returncode, output)


@dataclass
class Launch:
    out: Path
    result: subprocess.CompletedProcess

    def plans(self, name: str) -> list[Plan | None]:
        """The plan each rank trained fit `name` with."""
        states = [json.loads((self.out / f"{name}_rank{rank}_plan.json").read_text()) for rank in (0, 1)]
        return [None if state is None else plan_of_state(state) for state in states]

    def losses(self, name: str) -> list[float]:
        """The global batch's loss at each step: the mean of the ranks' (each rank's micro-batch is the same size)."""
        files = [self.out / f"{name}_rank{rank}.json" for rank in (0, 1)]
        assert all(f.is_file() for f in files), f"fit {name!r} did not finish:\n{self.result.stdout[-4000:]}"
        return torch.tensor([json.loads(f.read_text()) for f in files]).mean(0).tolist()


def one_process_fit(backend: str, optimizer: str | None = None, **trainer_kwargs) -> tuple[TinyLM, Any]:
    strategy = OffloadStrategy(backend=backend, optimizer=optimizer)
    return fit(strategy, module=TinyLM(scheduler="step"), batch_size=2 * PER_RANK_BATCH, num_batches=STEPS,
               gradient_clip_val=1.0, **trainer_kwargs)


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory) -> dict[str, tuple[list[float], Path]]:
    """One epoch at world size 1 per backend, saved for the two-process run to resume."""
    out = tmp_path_factory.mktemp("one_process")
    runs = {}
    for backend in ("fsdp", "deepspeed"):
        module, trainer = one_process_fit(backend)
        trainer.save_checkpoint(out / f"{backend}.ckpt")
        runs[backend] = module.losses, out / f"{backend}.ckpt"
    return runs


@pytest.fixture(scope="module")
def two_processes(one_process_runs, tmp_path_factory) -> Launch:
    out = tmp_path_factory.mktemp("two_processes")
    fits = [
        {"name": "fsdp", "backend": "fsdp", "save": str(out / "fsdp.ckpt")},
        {"name": "fsdp_8bit", "backend": "fsdp", "optimizer": "adamw8bit", "save": str(out / "fsdp_8bit.ckpt")},
        {"name": "deepspeed", "backend": "deepspeed", "save": str(out / "deepspeed.ckpt"),
         "save_weights_only": str(out / "deepspeed_weights.ckpt")},
        {"name": "device", "backend": "device"},
        {"name": "fsdp_resumed", "backend": "fsdp", "epochs": 2, "resume": str(one_process_runs["fsdp"][1])},
        {"name": "auto", "backend": "auto"},
        {"name": "auto_resumed", "backend": "auto", "epochs": 2, "resume": str(one_process_runs["fsdp"][1])},
        # Refused: the error ends the launch, so it comes last.
        {"name": "deepspeed_resumed", "backend": "deepspeed", "resume": str(one_process_runs["deepspeed"][1])},
    ]
    return Launch(out, launch_two_processes(out, fits))


@pytest.fixture(scope="module")
def fsdp_two_epochs() -> list[float]:
    module, _ = one_process_fit("fsdp", max_epochs=2)
    return module.losses


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed", "device"])
def test_two_processes_track_one_process_with_same_global_batch(backend, two_processes, one_process_runs) -> None:
    reference = one_process_runs[backend][0] if backend in one_process_runs else one_process_fit(backend)[0].losses
    assert_losses_close(two_processes.losses(backend), reference, WORLD_SIZE_RTOL)
    assert reference[-1] < 0.95 * reference[0]


def test_8bit_optimizer_steps_each_rank_shard(two_processes) -> None:
    reference, _ = one_process_fit("fsdp", optimizer="adamw8bit")
    assert_losses_close(two_processes.losses("fsdp_8bit"), reference.losses, EIGHT_BIT_WORLD_SIZE_RTOL)


def test_fsdp_checkpoint_moves_between_world_sizes(two_processes, one_process_runs, fsdp_two_epochs) -> None:
    # Two processes, then one: the second epoch resumes the two-process checkpoint in this process.
    second, _ = one_process_fit("fsdp", max_epochs=2, ckpt_path=str(two_processes.out / "fsdp.ckpt"))
    assert_losses_close(two_processes.losses("fsdp") + second.losses, fsdp_two_epochs, WORLD_SIZE_RTOL)
    # One process, then two.
    assert_losses_close(one_process_runs["fsdp"][0] + two_processes.losses("fsdp_resumed"), fsdp_two_epochs,
                        WORLD_SIZE_RTOL)


def test_auto_resumes_every_process_with_the_checkpoints_plan(two_processes, one_process_runs,
                                                              fsdp_two_epochs) -> None:
    saved = saved_plan(one_process_runs["fsdp"][1])
    assert saved is not None and saved.backend == "fsdp"
    fresh = two_processes.plans("auto")
    assert fresh[0] == fresh[1] and fresh[0].backend != "fsdp"  # what `auto` chooses for a new run
    assert two_processes.plans("auto_resumed") == [saved, saved]
    # A pinned backend's plan is saved across processes too, for a later resume under `auto`.
    assert saved_plan(two_processes.out / "fsdp.ckpt") == two_processes.plans("fsdp")[0]
    assert two_processes.plans("fsdp")[0].backend == "fsdp"
    assert_losses_close(one_process_runs["fsdp"][0] + two_processes.losses("auto_resumed"), fsdp_two_epochs,
                        WORLD_SIZE_RTOL)


def test_deepspeed_checkpoint_refuses_another_world_size(two_processes, one_process_runs) -> None:
    with pytest.raises(ValueError, match=r"written by 2 process\(es\) and this run has 1.*consolidate"):
        one_process_fit("deepspeed", ckpt_path=str(two_processes.out / "deepspeed.ckpt"))
    assert two_processes.result.returncode != 0
    assert "written by 1 process(es) and this run has 2" in two_processes.result.stdout
    # The way out the message names: the two-process checkpoint, whole, predicts as the one-process run does.
    # (Logits, not weights: Adam turns the rounding noise of gradients that should be zero - the attention key's
    # bias - into full-size steps, which move those weights but not the function.)
    two, one = TinyLM(), TinyLM()
    for module, checkpoint in ((two, two_processes.out / "deepspeed.ckpt"), (one, one_process_runs["deepspeed"][1])):
        module.configure_model()
        module.load_state_dict(consolidate(checkpoint), strict=True)
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(two(tokens), one(tokens), rtol=0, atol=1e-4)


def test_deepspeed_weights_only_checkpoint_leaves_out_every_ranks_optimizer_state(two_processes) -> None:
    from tests.test_strategy_checkpoints import saved_optimizer_tensors

    full, weights = two_processes.out / "deepspeed.ckpt", two_processes.out / "deepspeed_weights.ckpt"
    assert len(list((weights / "checkpoint").glob("*optim_states.pt"))) == 2
    assert saved_optimizer_tensors(full) > 0
    assert saved_optimizer_tensors(weights) == 0
    expected, saved = consolidate(full), consolidate(weights)
    assert expected.keys() == saved.keys()
    assert all(torch.equal(expected[name], saved[name]) for name in expected)


def test_8bit_shard_state_refuses_another_world_size(two_processes) -> None:
    with pytest.raises(ValueError, match=r"`AdamW8bit` state for 2 process\(es\) and this run has 1"):
        one_process_fit("fsdp", optimizer="adamw8bit", ckpt_path=str(two_processes.out / "fsdp_8bit.ckpt"))


@pytest.mark.parametrize("namespace", ["lightning.pytorch", "pytorch_lightning"])
def test_offload_names_build_a_multi_process_trainer(namespace: str, monkeypatch) -> None:
    lightning = pytest.importorskip(namespace)
    for variable in _RANK_VARIABLES:  # left by one-process fits: they would read as an external launcher's
        monkeypatch.delenv(variable, raising=False)
    names = {"offload", "offload_deepspeed", "offload_fsdp", "offload_device"}
    assert names <= set(lightning.strategies.StrategyRegistry)
    trainer = lightning.Trainer(strategy="offload_fsdp", accelerator="cpu", devices=2, num_nodes=3, logger=False)
    assert type(trainer.strategy).__name__ == "OffloadStrategy" and trainer.strategy.backend_name == "fsdp"
    assert trainer.world_size == 6 and trainer.strategy.distributed_sampler_kwargs == {"num_replicas": 6, "rank": 0}
    assert type(trainer.strategy.launcher).__name__ == "_SubprocessScriptLauncher"
    one = lightning.Trainer(strategy="offload", accelerator="cpu", devices=1, logger=False)
    assert one.strategy.launcher is None and not one.strategy.is_distributed


def test_one_gpu_engines_are_refused_across_processes(monkeypatch) -> None:
    import lightning.pytorch as pl

    for variable in _RANK_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    trainer = pl.Trainer(strategy="offload_host_adam", accelerator="cpu", devices=2, logger=False)
    refused = r"`backend='host_adam'` trains on one device.*`backend='deepspeed'` or `backend='fsdp'`"
    with pytest.raises(ValueError, match=refused):
        trainer.strategy._setup_processes()


def test_single_gpu_offload_refuses_several_devices_naming_offload() -> None:
    with pytest.raises(ValueError, match=r"trains on one device.*strategy='offload'"):
        fit("single_gpu_offload", devices=2)


def test_devices_and_nodes_are_settable_from_the_command_line(tmp_path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from lightning_offload.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["strategy=fsdp", "trainer.devices=2", "trainer.num_nodes=2"])
    GlobalHydra.instance().clear()
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (2, 2)
    assert isinstance(instantiate(cfg.strategy), OffloadStrategy)
