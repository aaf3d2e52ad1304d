"""Many fits in one process, as in a notebook (a cell run again, after Ctrl+C too) or a Hydra `-m` sweep: each fit
trains as it would in a fresh process, and what a run allocated is released by the next one."""

from __future__ import annotations

import csv
import ctypes
import gc
import signal
import subprocess
import sys
import threading
import weakref
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import psutil
import pytest
import torch

from lightning_offload import SingleGPUOffloadStrategy
from lightning_offload.models import TinyGPT
from tests.conftest import SEQ_LEN, VOCAB, TinyLM, fit, in_a_fresh_process, token_batches

ROOT = Path(__file__).resolve().parents[1]
# Each CPU backend at a precision it trains with (`stream` and the 8-bit plan keep bf16 weights).
BACKENDS = {"device": "32-true", "host_adam": "32-true", "stream": "bf16-true", "deepspeed": "32-true",
            "fsdp": "32-true", "gpu_8bit": "bf16-mixed"}
# The backends that keep their engine after `fit`, for `trainer.save_checkpoint` and a next fit of the same model.
KEEP_ENGINE = ["host_adam", "stream", "deepspeed"]


def seeded_fit(backend: str | None, module: pl.LightningModule | None = None, num_batches: int = 4,
               precision: str | None = None, **trainer_kwargs: Any) -> tuple[Any, pl.Trainer]:
    """One fit as a notebook cell runs it: the same seed, a new strategy and Trainer (`backend=None`: `auto`)."""
    pl.seed_everything(0, verbose=False)
    strategy = SingleGPUOffloadStrategy() if backend is None else SingleGPUOffloadStrategy(backend=backend)
    precision = precision or ("32-true" if backend is None else BACKENDS[backend])
    return fit(strategy, num_batches=num_batches, precision=precision, module=module or TinyLM(), **trainer_kwargs)


class WiderLM(TinyLM):
    """A larger model than `TinyLM` (twice its width and depth), for a fit after a smaller one."""

    def __init__(self, d_model: int = 64, n_layers: int = 4) -> None:
        super().__init__()
        self.d_model, self.n_layers = d_model, n_layers

    def configure_model(self) -> None:
        if self.net is None:
            with torch.random.fork_rng():
                torch.manual_seed(self.hparams.init_seed)
                self.net = TinyGPT(vocab_size=VOCAB, d_model=self.d_model, n_layers=self.n_layers, n_heads=2,
                                   max_seq_len=SEQ_LEN)


def wider_auto_run() -> dict[str, Any]:
    module, trainer = seeded_fit(None, module=WiderLM())
    return {"losses": module.losses, "plan": str(trainer.strategy.plan)}


def losses_of(backend: str) -> list[float]:
    return seeded_fit(backend)[0].losses


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_fit_repeated_in_the_process_trains_as_in_a_fresh_process(backend: str) -> None:
    first, second = losses_of(backend), losses_of(backend)
    assert first == second
    assert first == in_a_fresh_process(__name__, f"losses_of({backend!r})")


@pytest.mark.slow
def test_a_larger_model_after_every_backend_plans_and_trains_as_in_a_fresh_process() -> None:
    for backend in BACKENDS:
        seeded_fit(backend)
    after = wider_auto_run()
    fresh = in_a_fresh_process(__name__, "wider_auto_run()")
    assert after == fresh


@pytest.fixture
def sigint_kept() -> Any:
    """Lightning ignores Ctrl+C while it shuts down an interrupted fit; the test process keeps its handler."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


class StoppedInBackward(TinyLM):
    """Raises `KeyboardInterrupt` (Ctrl+C) halfway through the backward of its `stop_at`-th step: the last block's
    gradients are done (engines that update inside backward have started on them), the first block's are not."""

    def __init__(self, stop_at: int = 2) -> None:
        super().__init__()
        self.stop_at = stop_at

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if len(self.losses) == self.stop_at - 1:
            self.net.blocks[0].register_forward_hook(_interrupt_in_backward)
        return super().training_step(batch, batch_idx)


class StoppedInForward(StoppedInBackward):
    """Raises `KeyboardInterrupt` inside the last block's forward (inside the engine's forward hooks)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if len(self.losses) == self.stop_at - 1:
            self.net.blocks[-1].register_forward_pre_hook(lambda *_: _interrupt())
        return TinyLM.training_step(self, batch, batch_idx)


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def _interrupt_in_backward(_module: Any, _args: Any, output: torch.Tensor) -> None:
    output.register_hook(_interrupt)


def alive(ref: weakref.ref) -> bool:
    gc.collect()
    return ref() is not None


# Every engine is stopped inside the backward that updates it; ZeRO-3 also inside its forward hooks, which push
# modules on a process-wide stack.
@pytest.mark.parametrize("backend,stopped", [*((backend, StoppedInBackward) for backend in BACKENDS),
                                             ("deepspeed", StoppedInForward)])
def test_a_fit_after_ctrl_c_trains_as_an_uninterrupted_one_and_frees_the_stopped_run(
        backend: str, stopped: type, sigint_kept: Any) -> None:
    reference = losses_of(backend)
    interrupted = stopped()
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown ends with `sys.exit(1)`
        seeded_fit(backend, module=interrupted)
    assert interrupted.trainer.global_step == interrupted.stop_at - 1
    run = weakref.ref(interrupted)
    del interrupted
    assert losses_of(backend) == reference
    assert not alive(run), "the interrupted run's model is kept alive"


@pytest.mark.parametrize("backend", KEEP_ENGINE)
def test_a_fit_with_another_backend_releases_the_engine_kept_after_fit(backend: str, tmp_path) -> None:
    module, trainer = seeded_fit(backend)
    seeded_fit("device")
    # Released although the first run's model and Trainer are still held (a notebook's variables): saving says so.
    with pytest.raises(RuntimeError, match="released when a later `fit`"):
        trainer.save_checkpoint(tmp_path / "released.ckpt")
    assert "host-adam" not in {thread.name for thread in threading.enumerate()}
    run, runner = weakref.ref(module), weakref.ref(trainer)
    del module, trainer
    assert not alive(run) and not alive(runner)


def test_host_adam_frees_its_host_state_with_the_model_and_trainer() -> None:
    # The engine stays after `fit` for a checkpoint or the next fit of the same model; without either, it is freed.
    module, trainer = seeded_fit("host_adam")
    engine = weakref.ref(trainer.strategy.backend.engine)
    del module, trainer
    assert not alive(engine)
    assert "host-adam" not in {thread.name for thread in threading.enumerate()}


class ValidatedLM(TinyLM):
    """TinyLM that validates, for `trainer.validate` after `fit`."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, targets = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(inputs).flatten(0, 1).float(), targets.flatten()))


def engine_and_host_buffers(trainer: pl.Trainer) -> list[Any]:
    """What a run keeps after `fit` for a checkpoint or the next fit: its engine and the host buffers it allocated."""
    backend = trainer.strategy.backend
    if backend.name == "stream":  # the streaming engine is the backend itself, its arenas the host buffers
        return [backend, *(arena.buffer for arena in backend._arenas)]
    if backend.name == "deepspeed":  # ZeRO-3's fp32 master partitions, with the optimizer state in host memory
        return [backend.engine, *backend.engine.optimizer.fp32_partitioned_groups_flat]
    return [backend.engine, backend.engine.arena]


@pytest.mark.parametrize("backend", KEEP_ENGINE)
def test_a_run_the_user_drops_is_freed_without_another_fit(backend: str) -> None:
    # A notebook's `del trainer, model; gc.collect()`: the memory comes back before any later fit.
    module, trainer = seeded_fit(backend)
    kept = [weakref.ref(part) for part in [module, trainer, *engine_and_host_buffers(trainer)]]
    del module, trainer
    gc.collect()
    assert [ref() is None for ref in kept] == [True] * len(kept)


@pytest.mark.parametrize("backend", KEEP_ENGINE)
def test_a_run_is_kept_while_the_user_holds_its_trainer_or_model(backend: str, tmp_path) -> None:
    module, trainer = seeded_fit(backend, module=ValidatedLM())
    kept = [weakref.ref(part) for part in engine_and_host_buffers(trainer)]
    del trainer
    gc.collect()
    assert all(ref() is not None for ref in kept), "released while the user holds the model"
    trainer, module = module.trainer, None
    gc.collect()
    assert all(ref() is not None for ref in kept), "released while the user holds the Trainer"
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    [validated] = trainer.validate(trainer.lightning_module, token_batches(2, seed=1), verbose=False)
    assert torch.isfinite(torch.tensor(validated["val_loss"]))
    trainer.save_checkpoint(tmp_path / "after_validate.ckpt")
    del trainer
    gc.collect()
    assert all(ref() is None for ref in kept)


def test_a_dropped_deepspeed_run_hands_back_the_memory_torch_cached_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # Its GPU blocks and pinned host buffers go to torch's caches when collected; emptied after that collection.
    from lightning_offload.backends import deepspeed

    module, trainer = seeded_fit("deepspeed")
    emptied = []
    monkeypatch.setattr(deepspeed, "_empty_caches", lambda: emptied.append(alive(run)))
    run = weakref.ref(module)
    del module, trainer
    gc.collect()
    assert emptied == [False]


def test_a_deepspeed_run_is_freed_by_the_next_one() -> None:
    # ZeRO-3 keeps each engine's model on a process-wide stack that its `destroy()` leaves: every run's model,
    # Trainer and optimizer state used to stay alive.
    first, trainer = seeded_fit("deepspeed")
    run, runner = weakref.ref(first), weakref.ref(trainer)
    del first, trainer
    seeded_fit("deepspeed")
    assert not alive(run) and not alive(runner)


class ModerateLM(WiderLM):
    """~3M parameters: one run's optimizer state (12 bytes per parameter) is tens of MiB, far above RSS noise."""

    def __init__(self) -> None:
        super().__init__(d_model=256, n_layers=4)


def settled_rss() -> int:
    """Process RSS after collecting garbage and handing freed heap pages back to the system."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return psutil.Process().memory_info().rss


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim settles RSS")
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_host_memory_of_a_run_is_released_by_the_next(backend: str) -> None:
    parameters = sum(p.numel() for p in ModerateLM().net_for_counting().parameters())
    runs = []
    for _ in range(3):
        seeded_fit(backend, module=ModerateLM(), num_batches=1)
        runs.append(settled_rss())
    # Fits after the first hold the same memory: the first pays once for lazy imports, compiled ops and allocator
    # pools; RSS then moves by at most 3 MiB per fit (Python objects, the allocator; `stream` measured). One run's optimizer state left
    # behind (12 bytes per parameter) is four times this tolerance.
    tolerance = 3 * parameters
    assert runs[2] - runs[1] < tolerance and runs[1] - runs[0] < tolerance, [r / 2**20 for r in runs]


# A short run of the Hydra app that `stream` runs too: a repeated block to stream, no clipping by global norm.
SHORT_RUN = ["trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
             "data.max_bytes=100000", "data.batch_size=4", "data.seq_len=32", "model.network.d_model=32",
             "model.network.n_layers=2", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
             "trainer.gradient_clip_val=0"]
SWEPT = ["deepspeed", "stream", "host_adam"]


def logged_losses(run_dir: Path) -> list[tuple[str, str]]:
    rows = csv.DictReader((run_dir / "csv" / "metrics.csv").open())
    return [(row["step"], row["train/loss"]) for row in rows if row["train/loss"]]


def run_app(*arguments: str) -> None:
    done = subprocess.run([sys.executable, "-m", "lightning_offload.train", *arguments, *SHORT_RUN], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_each_job_of_a_sweep_trains_as_its_own_run(tmp_path) -> None:
    run_app("-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", f"strategy={','.join(SWEPT)}")
    for job, strategy in enumerate(SWEPT):
        run_app(f"hydra.run.dir={tmp_path / strategy}", f"strategy={strategy}")
        alone = logged_losses(tmp_path / strategy)
        assert len(alone) == 4
        assert logged_losses(tmp_path / "sweep" / str(job)) == alone, strategy
