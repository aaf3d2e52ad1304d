"""Lightning's checkpoint API on every backend that runs on the CPU, against `strategy="auto"`: weights-only saves,
`ckpt_path="best"`/`"last"` for validate, test and predict, `save_top_k` removing old checkpoints, and
`load_from_checkpoint`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_offload import SingleGPUOffloadStrategy, consolidate
from tests.conftest import TinyLM, token_batches

# backend -> (strategy options, precision it trains in on the CPU)
BACKENDS = {
    "device": (dict(backend="device"), "32-true"),
    "gpu_8bit": (dict(backend="gpu_8bit"), "bf16-mixed"),
    "host_adam": (dict(backend="host_adam", check_memory=False, bucket_numel=3000, chunk_numel=700), "32-true"),
    "stream": (dict(backend="stream", check_memory=False, resident_blocks=0, stream_outer=True, build_on_meta=False),
               "bf16-true"),
    "deepspeed": (dict(backend="deepspeed"), "32-true"),
    "fsdp": (dict(backend="fsdp"), "32-true"),
}
# The backends whose fp32 runs follow the plain fp32 run: host_adam's and fsdp's fused host AdamW and DeepSpeed's
# CPU Adam against torch's foreach one differ by float rounding (measured: 2e-7 relative on the losses, 1.5e-5
# absolute on the logits); the best and last checkpoints' losses differ by 6%.
FOLLOWS_PLAIN_FP32_RTOL, FOLLOWS_PLAIN_FP32_ATOL = 1e-5, 1e-4
# The monitored score per epoch: the best epoch (1) is neither the first nor the last, and with `save_top_k=2`
# epoch 0's checkpoint is removed when epoch 2's is saved.
SCORES = (3.0, 1.0, 2.0, 4.0)


def strategy(backend: str) -> Any:
    return "auto" if backend == "auto" else SingleGPUOffloadStrategy(**BACKENDS[backend][0])


def precision(backend: str) -> str:
    return "32-true" if backend == "auto" else BACKENDS[backend][1]


class ValidatedLM(TinyLM):
    """TinyLM with validate, test and predict steps, and a score that makes epoch 1 the best."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.val_losses: list[float] = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, targets = batch
        self.log("val_loss", F.cross_entropy(self(inputs).flatten(0, 1).float(), targets.flatten()))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).float()

    def on_validation_epoch_end(self) -> None:
        if self.trainer.state.fn == "fit":
            self.log("score", SCORES[self.current_epoch])

    def on_validation_end(self) -> None:
        if self.trainer.state.fn == "fit":
            self.val_losses.append(self.trainer.callback_metrics["val_loss"].item())


def train(backend: str, folder: Path, **checkpoint_options: Any) -> tuple[ValidatedLM, pl.Trainer, ModelCheckpoint]:
    callback = ModelCheckpoint(dirpath=folder, filename="{epoch}", **checkpoint_options)
    module = ValidatedLM()
    trainer = pl.Trainer(strategy=strategy(backend), precision=precision(backend), accelerator="cpu", devices=1,
                         max_epochs=len(SCORES), logger=False, callbacks=[callback], enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=token_batches(2), val_dataloaders=token_batches(2, seed=1))
    return module, trainer, callback


def saved_optimizer_tensors(path: Path) -> int:
    """How many optimizer-state tensors the checkpoint at `path` holds, in whichever backend's format."""
    from lightning_offload.backends import host_adam
    from lightning_offload.backends.stream.checkpoint import read_manifest

    def tensors(obj: Any) -> int:
        if isinstance(obj, torch.Tensor):
            return 1
        values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []
        return sum(tensors(value) for value in values)

    if path.is_file():
        return tensors(torch.load(path, weights_only=False).get("optimizer_states", []))
    if (path / "manifest.json").is_file():
        return sum(tensors(torch.load(path / unit["file"], weights_only=True)["state"])
                   for unit in read_manifest(path)["units"])
    if (path / host_adam.CHECKPOINT_FILE).is_file():
        state = host_adam.read_checkpoint(path)
        return sum(exp_avg is not None for _, exp_avg, _ in host_adam.saved_parameters(state))
    return sum(tensors(torch.load(file, weights_only=False)["optimizer_state_dict"]["optimizer_state_dict"]["state"])
               for file in (path / "checkpoint").glob("*optim_states.pt"))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_weights_only_saves_hold_the_weights_without_optimizer_state(tmp_path, backend: str) -> None:
    module, trainer, _ = train(backend, tmp_path / "kept", save_weights_only=True, save_top_k=1, monitor="score")
    kept = tmp_path / "kept" / "epoch=1.ckpt"
    trainer.save_checkpoint(tmp_path / "before_validate.ckpt")
    trainer.validate(module, token_batches(2, seed=1), verbose=False)
    trainer.save_checkpoint(tmp_path / "full.ckpt")
    trainer.save_checkpoint(tmp_path / "weights.ckpt", weights_only=True)

    # Validating after fit keeps the trained state: a save after it holds what one before it held.
    assert saved_optimizer_tensors(tmp_path / "full.ckpt") == saved_optimizer_tensors(tmp_path / "before_validate.ckpt")
    before = consolidate(tmp_path / "before_validate.ckpt")
    assert all(torch.equal(before[name], value) for name, value in consolidate(tmp_path / "full.ckpt").items())
    assert saved_optimizer_tensors(tmp_path / "full.ckpt") > 0
    assert saved_optimizer_tensors(tmp_path / "weights.ckpt") == 0
    assert saved_optimizer_tensors(kept) == 0
    full, weights = consolidate(tmp_path / "full.ckpt"), consolidate(tmp_path / "weights.ckpt")
    assert full.keys() == weights.keys()
    assert all(torch.equal(full[name], weights[name]) for name in full)

    # Validating from a weights-only checkpoint gives what validating from the full one gives.
    data = token_batches(2, seed=1)
    from_full = trainer.validate(module, data, ckpt_path=tmp_path / "full.ckpt", verbose=False)[0]["val_loss"]
    from_weights = trainer.validate(module, data, ckpt_path=tmp_path / "weights.ckpt", verbose=False)[0]["val_loss"]
    assert from_weights == from_full


@pytest.mark.parametrize("backend", ["auto", *sorted(BACKENDS)])
def test_resuming_from_a_weights_only_checkpoint_is_refused_as_lightning_refuses(tmp_path, backend: str) -> None:
    _, trainer, _ = train(backend, tmp_path / "kept", save_weights_only=True, save_top_k=1, monitor="score")
    resumed = pl.Trainer(strategy=strategy(backend), precision=precision(backend), accelerator="cpu", devices=1,
                         max_epochs=len(SCORES) + 1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    saved = tmp_path / "kept" / "epoch=1.ckpt"
    message = r"contains only the model" if backend == "auto" else r"weights only.*load_from_checkpoint"
    with pytest.raises(KeyError, match=message):
        resumed.fit(ValidatedLM(), train_dataloaders=token_batches(2), ckpt_path=saved)

    # What the message advises: a new fit that starts from the checkpoint's weights.
    inputs, targets = next(iter(token_batches(2)))

    def first_loss(module: ValidatedLM) -> float:
        return F.cross_entropy(module(inputs).flatten(0, 1), targets.flatten()).item()

    restarted, untrained = ValidatedLM.load_from_checkpoint(saved), ValidatedLM()
    untrained.configure_model()
    from_checkpoint, from_scratch = first_loss(restarted), first_loss(untrained)
    assert from_checkpoint != from_scratch
    restart = pl.Trainer(strategy=strategy(backend), precision=precision(backend), accelerator="cpu", devices=1,
                         max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    restart.fit(restarted, train_dataloaders=token_batches(2))
    assert abs(restarted.losses[0] - from_checkpoint) < abs(restarted.losses[0] - from_scratch)


def evaluate(trainer: pl.Trainer, module: ValidatedLM, ckpt_path: Any) -> tuple[float, float, torch.Tensor]:
    data = token_batches(2, seed=1)
    validated = trainer.validate(module, data, ckpt_path=ckpt_path, verbose=False)[0]["val_loss"]
    tested = trainer.test(module, data, ckpt_path=ckpt_path, verbose=False)[0]["val_loss"]
    return validated, tested, torch.cat(trainer.predict(module, data, ckpt_path=ckpt_path))


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> dict[str, Any]:
    module, trainer, callback = train("auto", tmp_path_factory.mktemp("auto"), monitor="score", save_top_k=2,
                                      save_last=True)
    return {name: evaluate(trainer, module, name) for name in ("best", "last")}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_best_and_last_load_the_right_weights_and_old_bests_go_whole(tmp_path, backend: str, plain_run) -> None:
    module, trainer, callback = train(backend, tmp_path, monitor="score", save_top_k=2, save_last=True)
    # Epoch 0's checkpoint was removed when epoch 2's came; nothing else is left in the folder, hidden files included.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=1.ckpt", "epoch=2.ckpt", "last.ckpt"]
    assert Path(callback.best_model_path).name == "epoch=1.ckpt"
    best_epoch = SCORES.index(min(SCORES))
    # `save_last=True` copies every saved checkpoint to last.ckpt: the last epoch among the two best so far.
    last_epoch = max(epoch for epoch in range(len(SCORES)) if SCORES[epoch] in sorted(SCORES[:epoch + 1])[:2])
    assert len({module.val_losses[best_epoch], module.val_losses[last_epoch], module.val_losses[-1]}) == 3

    for ckpt_path, epoch in (("best", best_epoch), ("last", last_epoch), (tmp_path / "epoch=1.ckpt", best_epoch)):
        validated, tested, predicted = evaluate(trainer, module, ckpt_path)
        assert validated == pytest.approx(module.val_losses[epoch], rel=1e-6)
        assert tested == validated
        name = ckpt_path if isinstance(ckpt_path, str) else "best"
        if precision(backend) == "32-true" and backend != "gpu_8bit":
            plain_validated, _, plain_predicted = plain_run[name]
            assert validated == pytest.approx(plain_validated, rel=FOLLOWS_PLAIN_FP32_RTOL)
            torch.testing.assert_close(predicted, plain_predicted, rtol=FOLLOWS_PLAIN_FP32_RTOL,
                                       atol=FOLLOWS_PLAIN_FP32_ATOL)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_load_from_checkpoint_reads_every_backends_checkpoint(tmp_path, backend: str) -> None:
    module = ValidatedLM(lr=5e-3)  # not the default, so hyperparameters not read would show
    trainer = pl.Trainer(strategy=strategy(backend), precision=precision(backend), accelerator="cpu", devices=1,
                         max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, train_dataloaders=token_batches(2))
    trainer.save_checkpoint(tmp_path / "full.ckpt")
    trainer.save_checkpoint(tmp_path / "weights.ckpt", weights_only=True)
    consolidate(tmp_path / "full.ckpt", tmp_path / "lightning.ckpt", lightning_file=True)

    for saved in ("full.ckpt", "weights.ckpt", "lightning.ckpt"):
        loaded = ValidatedLM.load_from_checkpoint(tmp_path / saved)
        assert loaded.hparams.lr == module.hparams.lr
        expected = consolidate(tmp_path / saved)
        state_dict = loaded.state_dict()
        assert state_dict.keys() == expected.keys()
        assert all(torch.equal(state_dict[name], expected[name]) for name in expected)


def test_both_lightning_namespaces_read_checkpoint_folders() -> None:
    import lightning.pytorch.core.saving
    import pytorch_lightning.core.saving

    assert lightning.pytorch.core.saving.pl_load.reads_checkpoint_folders
    assert pytorch_lightning.core.saving.pl_load.reads_checkpoint_folders
