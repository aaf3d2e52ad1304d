"""Lightning's checkpoint API on every backend that runs on the CPU, against `strategy="auto"`: weights-only saves,
`ckpt_path="best"`/`"last"` for validate, test and predict, `save_top_k` removing old checkpoints, and
`load_from_checkpoint`."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_offload import SingleGPUOffloadStrategy, consolidate
from lightning_offload.export import saved_tensors
from tests.conftest import VOCAB, TinyLM, token_batches
from tests.test_saving import storage_tags, tagged_on

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


def one_epoch_trainer(backend: str, accelerator: str = "cpu") -> pl.Trainer:
    """A quiet Trainer of one epoch on `backend`, in the precision it trains in."""
    return pl.Trainer(strategy=strategy(backend), precision=precision(backend), accelerator=accelerator, devices=1,
                      max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)


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
    restart = one_epoch_trainer(backend)
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
    trainer = one_epoch_trainer(backend)
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


# The backends that save a folder of their own files rather than Lightning's file.
FOLDER_BACKENDS = ("deepspeed", "host_adam", "stream")


class Note:
    """A hyperparameter `torch.load(weights_only=True)` refuses to unpickle."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Note)


@pytest.fixture(scope="module")
def saved_once(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """backend -> its checkpoint after one epoch ("own": its folder, or Lightning's file under strategy="auto") and
    the same weights and state as Lightning's file ("file")."""
    saved = {}
    for backend in ("auto", *FOLDER_BACKENDS):
        folder = tmp_path_factory.mktemp(backend)
        trainer = one_epoch_trainer(backend)
        trainer.fit(ValidatedLM(), train_dataloaders=token_batches(2))
        trainer.save_checkpoint(folder / "own.ckpt")
        if backend == "auto":
            saved[backend] = {"own": folder / "own.ckpt", "file": folder / "own.ckpt"}
            continue
        consolidate(folder / "own.ckpt", folder / "file.ckpt", lightning_file=True)
        saved[backend] = {"own": folder / "own.ckpt", "file": folder / "file.ckpt"}
    return saved


def loaded_or_error(path: Path, **load_options: Any) -> Any:
    """The state dict `load_from_checkpoint(path, **load_options)` gives, or the error it raises."""
    try:
        return ValidatedLM.load_from_checkpoint(path, **load_options).state_dict()
    except Exception as error:
        return error


def assert_same_load(from_folder: Any, from_file: Any) -> None:
    if isinstance(from_file, Exception):
        assert type(from_folder) is type(from_file) and str(from_folder) == str(from_file)
        return
    assert not isinstance(from_folder, Exception), from_folder
    assert from_folder.keys() == from_file.keys()
    for name, expected in from_file.items():
        assert (from_folder[name].device, from_folder[name].dtype) == (expected.device, expected.dtype)
        if expected.device.type != "meta":
            assert torch.equal(from_folder[name], expected)


MAP_LOCATIONS = {
    "default": None,
    "dict_from_gpu": {"cuda:0": "cpu"},
    "dict_cpu": {"cpu": "cpu"},
    "dict_to_meta": {"cpu": "meta"},
    "device": torch.device("cpu"),
    "name": "cpu",
    "meta": "meta",
}


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
@pytest.mark.parametrize("map_location", sorted(MAP_LOCATIONS))
def test_load_from_checkpoint_maps_a_folder_as_the_same_checkpoint_in_one_file(saved_once, backend: str,
                                                                               map_location: str) -> None:
    paths = saved_once[backend]
    options = {"map_location": MAP_LOCATIONS[map_location]}
    assert_same_load(loaded_or_error(paths["own"], **options), loaded_or_error(paths["file"], **options))


@pytest.mark.gpu
@pytest.mark.parametrize("map_location", [{"cpu": "cuda:0"}, "cuda:0", torch.device("cuda", 0)], ids=str)
def test_load_from_checkpoint_maps_a_folder_onto_the_gpu(saved_once, map_location: Any) -> None:
    for backend in FOLDER_BACKENDS:
        loaded = loaded_or_error(saved_once[backend]["own"], map_location=map_location)
        assert_same_load(loaded, loaded_or_error(saved_once[backend]["file"], map_location=map_location))
        assert {value.device for value in loaded.values()} == {torch.device("cuda", 0)}


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_load_from_checkpoint_hands_a_folders_tensors_to_a_map_location_function(saved_once, backend: str) -> None:
    seen: dict[str, list[tuple[str, int]]] = {}
    for form in ("own", "file"):
        seen[form] = []

        def record(storage: torch.UntypedStorage, location: str, calls: list = seen[form]) -> None:
            calls.append((location, storage.nbytes()))  # None: torch.load's own placement

        loaded = ValidatedLM.load_from_checkpoint(saved_once[backend][form], map_location=record)
        assert all(value.device.type == "cpu" for value in loaded.state_dict().values())
    assert seen["own"] and sorted(seen["own"]) == sorted(seen["file"])


class NotedLM(ValidatedLM):
    """ValidatedLM that saves a `Note` beside its state, and remembers the one it loads."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["note"] = Note()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.note = checkpoint.get("note")


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_load_from_checkpoint_passes_weights_only_on_to_a_folder(tmp_path, backend: str) -> None:
    trainer = one_epoch_trainer(backend)
    trainer.fit(NotedLM(), train_dataloaders=token_batches(2))
    trainer.save_checkpoint(tmp_path / "own.ckpt")
    consolidate(tmp_path / "own.ckpt", tmp_path / "file.ckpt", lightning_file=True)

    def load(path: Path, weights_only: bool | None) -> Any:
        try:
            return NotedLM.load_from_checkpoint(path, weights_only=weights_only)
        except Exception as error:
            return error

    for weights_only in (True, None):  # None: torch's default, which refuses such objects too
        from_folder, from_file = load(tmp_path / "own.ckpt", weights_only), load(tmp_path / "file.ckpt", weights_only)
        assert isinstance(from_file, pickle.UnpicklingError)
        assert type(from_folder) is type(from_file) and str(from_folder) == str(from_file)
    from_folder, from_file = load(tmp_path / "own.ckpt", False), load(tmp_path / "file.ckpt", False)
    assert from_folder.note == from_file.note == Note()
    assert_same_load(from_folder.state_dict(), from_file.state_dict())


# `single_gpu_offload` with `backend="auto"`, then each backend pinned.
READERS = ("auto", *sorted(BACKENDS))
# What each backend's precision computes as under strategy="auto": gpu_8bit runs bf16-mixed with bf16 weights.
PLAIN_PRECISION = {"gpu_8bit": "bf16-true"}


def reader_trainer(reader: str, writer: str, **options: Any) -> pl.Trainer:
    """A fresh Trainer on `reader`'s backend (`"auto"`: planned, in the precision `writer` trained in)."""
    options = dict(dict(max_epochs=1, logger=False, enable_checkpointing=False), **options)
    return pl.Trainer(strategy=SingleGPUOffloadStrategy() if reader == "auto" else strategy(reader),
                      precision=precision(writer if reader == "auto" else reader), accelerator="cpu", devices=1,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **options)


@pytest.mark.parametrize("writer", ["auto", *FOLDER_BACKENDS])
@pytest.mark.parametrize("reader", READERS)
def test_validate_test_and_predict_read_any_checkpoint_under_any_backend(saved_once, writer: str,
                                                                         reader: str) -> None:
    trainer = reader_trainer(reader, writer)
    validated, tested, predicted = evaluate(trainer, ValidatedLM(), saved_once[writer]["own"])
    if reader == "auto":  # the checkpoint's plan, or no offload for one without (its run skipped the planner)
        assert trainer.strategy.backend_name == (writer if writer == "deepspeed" else "device")

    # The same weights in Lightning's file, under strategy="auto" in the precision the backend computes in.
    computes_in = PLAIN_PRECISION.get(reader, trainer.precision)
    plain = pl.Trainer(strategy="auto", precision=computes_in, accelerator="cpu", devices=1, logger=False,
                       enable_progress_bar=False, enable_model_summary=False)
    plain_validated, plain_tested, plain_predicted = evaluate(plain, ValidatedLM(), saved_once[writer]["file"])
    assert (validated, tested) == (plain_validated, plain_tested)
    assert torch.equal(predicted, plain_predicted)


@pytest.mark.parametrize("writer", FOLDER_BACKENDS)
def test_fit_resumes_a_folder_under_auto_and_refuses_a_backend_that_cannot_before_building(
        tmp_path, saved_once, writer: str) -> None:
    folder = saved_once[writer]["own"]
    module = ValidatedLM()
    resumed = reader_trainer("auto", writer, max_epochs=2)
    resumed.fit(module, train_dataloaders=token_batches(2), ckpt_path=folder)
    assert resumed.strategy.backend_name == writer and len(module.losses) == 2  # the second epoch only
    pinned = ValidatedLM()
    reader_trainer(writer, writer, max_epochs=2).fit(pinned, train_dataloaders=token_batches(2), ckpt_path=folder)
    assert module.losses == pinned.losses

    for other in sorted(set(BACKENDS) - {writer}):
        module = ValidatedLM()
        with pytest.raises(ValueError, match=rf"a folder of the `{writer}` backend.*the `{other}` backend.*"
                                             rf"Resume with `backend='{writer}'`"):
            reader_trainer(other, writer, max_epochs=2).fit(module, token_batches(2), ckpt_path=folder)
        assert module.net is None  # refused before the model was built


@pytest.mark.parametrize("reader", FOLDER_BACKENDS)
def test_fit_refuses_lightnings_file_under_a_backend_that_saves_folders(saved_once, reader: str) -> None:
    module = ValidatedLM()
    with pytest.raises(ValueError, match=r"Lightning's single file.*Resume with `backend='device'` or "):
        reader_trainer(reader, reader, max_epochs=2).fit(module, token_batches(2), ckpt_path=saved_once["auto"]["own"])
    assert module.net is None


@pytest.mark.parametrize("writer", FOLDER_BACKENDS)
def test_a_fresh_trainer_validates_and_resumes_the_last_folder(tmp_path, writer: str) -> None:
    module, _, _ = train(writer, tmp_path, monitor="score", save_top_k=2, save_last=True)
    last_epoch = max(epoch for epoch in range(len(SCORES)) if SCORES[epoch] in sorted(SCORES[:epoch + 1])[:2])

    def fresh() -> pl.Trainer:
        callback = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", monitor="score", save_top_k=2,
                                   save_last=True)
        return reader_trainer("auto", writer, max_epochs=last_epoch + 2, callbacks=[callback],
                              enable_checkpointing=True)

    validated = fresh().validate(ValidatedLM(), token_batches(2, seed=1), ckpt_path="last", verbose=False)
    assert validated[0]["val_loss"] == module.val_losses[last_epoch]
    resumed = ValidatedLM()
    trainer = fresh()
    trainer.fit(resumed, train_dataloaders=token_batches(2), val_dataloaders=token_batches(2, seed=1),
                ckpt_path="last")
    assert trainer.strategy.backend_name == writer and len(resumed.val_losses) == 1  # the epoch after the last


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_validate_after_fit_from_lightnings_file_loads_it_into_the_engine(tmp_path, saved_once, backend: str) -> None:
    module, trainer, _ = train(backend, tmp_path / "kept", save_top_k=0)
    data, checkpoint = token_batches(2, seed=1), saved_once["auto"]["own"]
    validated = trainer.validate(module, data, ckpt_path=checkpoint, verbose=False)[0]["val_loss"]
    plain = pl.Trainer(strategy="auto", precision=trainer.precision, accelerator="cpu", devices=1, logger=False,
                       enable_progress_bar=False, enable_model_summary=False)
    assert validated == plain.validate(ValidatedLM(), data, ckpt_path=checkpoint, verbose=False)[0]["val_loss"]

    # What the engine saves next holds the loaded weights (in the precision it keeps them in), not the trained ones.
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    saved, loaded = consolidate(tmp_path / "after.ckpt"), consolidate(checkpoint)
    kept_in = torch.bfloat16 if precision(backend) == "bf16-true" else torch.float32
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[name], loaded[name].to(kept_in).float()) for name in loaded)


class TokenStats(torch.nn.Module):
    """A running mean of the input tokens, saved with the model (as a custom norm's running statistics are)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(()))

    def update(self, tokens: torch.Tensor) -> None:
        self.mean.mul_(0.5).add_(tokens.float().mean().to(self.mean.dtype), alpha=0.5)


class BufferedLM(ValidatedLM):
    """ValidatedLM with persistent buffers its training changes: a step counter, and a running mean of the tokens
    that scales the logits (a buffer lost on resume changes the losses); and a buffer that is not saved."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)
        self.token_stats = TokenStats()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return super().forward(tokens) * (1 + self.token_stats.mean / VOCAB)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps_seen += 1
        self.token_stats.update(batch[0])
        return super().training_step(batch, batch_idx)


SAVED_BUFFERS = ("steps_seen", "token_stats.mean")


def buffers_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: buffer.clone() for name, buffer in module.named_buffers() if name in SAVED_BUFFERS}


def assert_same_buffers(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(found) == sorted(expected)
    for name, value in expected.items():
        assert (found[name].dtype, found[name].tolist()) == (value.dtype, value.tolist()), name


def buffered_fit(backend: str, max_epochs: int, ckpt_path: Path | None = None,
                 precision_of: str | None = None) -> tuple[BufferedLM, pl.Trainer]:
    """A fit of `BufferedLM` under `backend`, in the precision `precision_of`'s backend trains in (default: its own)."""
    module = BufferedLM()
    trainer = pl.Trainer(strategy=strategy(backend), precision=precision(precision_of or backend), accelerator="cpu",
                         devices=1,
                         max_epochs=max_epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, train_dataloaders=token_batches(2), ckpt_path=ckpt_path)
    return module, trainer


@pytest.mark.parametrize("backend", ["auto", *FOLDER_BACKENDS])
def test_a_resumed_fit_restores_the_modules_persistent_buffers(tmp_path, backend: str) -> None:
    uninterrupted, _ = buffered_fit(backend, max_epochs=2)
    first, trainer = buffered_fit(backend, max_epochs=1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed, _ = buffered_fit(backend, max_epochs=2, ckpt_path=tmp_path / "epoch1.ckpt")
    assert int(uninterrupted.steps_seen) == 2 * int(first.steps_seen) > 0
    assert_same_buffers(buffers_of(resumed), buffers_of(uninterrupted))
    assert first.losses + resumed.losses == pytest.approx(uninterrupted.losses, rel=1e-6)


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_load_from_checkpoint_validate_and_consolidate_hold_the_modules_persistent_buffers(tmp_path,
                                                                                         backend: str) -> None:
    trained, trainer = buffered_fit(backend, max_epochs=1)
    trainer.save_checkpoint(tmp_path / "own.ckpt")
    trainer.save_checkpoint(tmp_path / "weights.ckpt", weights_only=True)
    _, plain_trainer = buffered_fit("auto", max_epochs=1, precision_of=backend)
    plain_trainer.save_checkpoint(tmp_path / "plain.ckpt")
    saved = buffers_of(trained)
    assert int(saved["steps_seen"]) > 0

    # `load_from_checkpoint` copies them into the buffers the module builds (fp32), as from Lightning's file.
    built = buffers_of(BufferedLM())
    as_built = {name: value.to(built[name].dtype) for name, value in saved.items()}
    assert_same_buffers(buffers_of(BufferedLM.load_from_checkpoint(tmp_path / "own.ckpt")), as_built)
    validated = BufferedLM()
    reader_trainer(backend, backend).validate(validated, token_batches(2, seed=1), ckpt_path=tmp_path / "own.ckpt",
                                              verbose=False)
    assert_same_buffers(buffers_of(validated), saved)

    # The consolidated state dict holds the buffers Lightning's file under strategy="auto" holds, in its dtypes.
    # A weights-only save holds them too, as Lightning's weights-only file does.
    from_plain = consolidate(tmp_path / "plain.ckpt")
    for saved_folder in ("own.ckpt", "weights.ckpt"):
        consolidated = consolidate(tmp_path / saved_folder)
        assert consolidated.keys() == from_plain.keys()
        assert_same_buffers({name: consolidated[name] for name in SAVED_BUFFERS},
                            {name: from_plain[name] for name in SAVED_BUFFERS})
    consolidate(tmp_path / "own.ckpt", tmp_path / "file.ckpt", lightning_file=True)
    assert_same_buffers(buffers_of(BufferedLM.load_from_checkpoint(tmp_path / "file.ckpt")), as_built)
    # `export_hf` reads them as saved.
    exported = {name: saved_tensor.load() for saved_tensor in saved_tensors(tmp_path / "own.ckpt")
                for name in saved_tensor.names if name in SAVED_BUFFERS}
    assert_same_buffers({name: value.to(saved[name].dtype) for name, value in exported.items()}, saved)


def without_saved_buffers(folder: Path) -> None:
    """Turns a `stream` folder into one written before the module's buffers were saved."""
    from lightning_offload.backends.stream.checkpoint import MANIFEST

    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / manifest.pop("buffers")).unlink()
    (folder / MANIFEST).write_text(json.dumps(manifest))


def test_a_stream_folder_without_saved_buffers_loads_its_weights_and_refuses_a_strict_load_naming_the_fix(
        tmp_path) -> None:
    trained, trainer = buffered_fit("stream", max_epochs=1)
    trainer.save_checkpoint(tmp_path / "old.ckpt")
    without_saved_buffers(tmp_path / "old.ckpt")
    weights = {name: value for name, value in consolidate(tmp_path / "old.ckpt").items()}
    assert not set(SAVED_BUFFERS) & set(weights)

    with pytest.raises(KeyError, match=r"did not save the module's buffers.*'steps_seen'.*`strict_loading = False`"):
        buffered_fit("stream", max_epochs=2, ckpt_path=tmp_path / "old.ckpt")
    lenient = BufferedLM()
    lenient.strict_loading = False
    validated = reader_trainer("stream", "stream").validate(lenient, token_batches(2, seed=1),
                                                            ckpt_path=tmp_path / "old.ckpt", verbose=False)
    assert validated and int(lenient.steps_seen) == 0  # the buffers as the module built them
    assert all(torch.equal(lenient.state_dict()[name].float(), value) for name, value in weights.items())
    loaded = BufferedLM.load_from_checkpoint(tmp_path / "old.ckpt", strict=False)
    assert all(torch.equal(loaded.state_dict()[name], value) for name, value in weights.items())

    # A module without persistent buffers resumes such a folder as before.
    plain = one_epoch_trainer("stream")
    plain.fit(ValidatedLM(), train_dataloaders=token_batches(2))
    plain.save_checkpoint(tmp_path / "plain.ckpt")
    without_saved_buffers(tmp_path / "plain.ckpt")
    resumed = ValidatedLM()
    reader_trainer("stream", "stream", max_epochs=2).fit(resumed, token_batches(2), ckpt_path=tmp_path / "plain.ckpt")
    assert len(resumed.losses) == 2  # the second epoch only


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_a_folder_without_the_modules_buffers_is_refused_by_a_strict_load_as_lightning_refuses_it(
        tmp_path, backend: str) -> None:
    trainer = reader_trainer(backend, backend)
    trainer.fit(ValidatedLM(), train_dataloaders=token_batches(2))
    trainer.save_checkpoint(tmp_path / "own.ckpt")
    refusals = (KeyError, ValueError, RuntimeError)  # each engine's, and DeepSpeed's `load_state_dict`'s on resume
    with pytest.raises(refusals, match=r"lacks.*steps_seen"):
        reader_trainer(backend, backend).validate(BufferedLM(), token_batches(2, seed=1),
                                                  ckpt_path=tmp_path / "own.ckpt", verbose=False)
    with pytest.raises(refusals, match=r"steps_seen"):
        buffered_fit(backend, max_epochs=2, ckpt_path=tmp_path / "own.ckpt")
    lenient = BufferedLM()
    lenient.strict_loading = False
    reader_trainer(backend, backend).validate(lenient, token_batches(2, seed=1), ckpt_path=tmp_path / "own.ckpt",
                                              verbose=False)
    assert int(lenient.steps_seen) == 0



@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_load_from_checkpoint_maps_a_folder_through_a_copying_map_location(saved_once, backend: str) -> None:
    # Copies into storages made beforehand, so the reader's freed storages are the only ones made meanwhile and their
    # addresses come back for later tensors (as a map onto `cuda:0` showed): each must get its own copy.
    pool = [torch.zeros(1 << 15, dtype=torch.uint8) for _ in range(128)]

    def copied(storage: torch.UntypedStorage, location: str) -> torch.UntypedStorage:
        target = pool.pop()
        target[:storage.nbytes()].copy_(torch.empty(0, dtype=torch.uint8).set_(storage))
        return target.untyped_storage()

    paths = saved_once[backend]
    assert_same_load(loaded_or_error(paths["own"], map_location=copied),
                     loaded_or_error(paths["file"], map_location=copied))


# Where the run that saved the `saved_on_gpu` checkpoints kept its weights (a CPU run, recorded as a GPU one's).
GPU_LOCATION = "cuda:0"


@pytest.fixture(scope="module")
def saved_on_gpu(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """backend -> its folder saved by a run that records its weights on `GPU_LOCATION` ("own"), Lightning's file of
    the same weights with its storages tagged there ("file"), as a GPU run writes it, and the folder's
    `consolidate(lightning_file=True)` ("consolidated")."""
    import lightning_offload.strategy

    saved = {}
    for backend in FOLDER_BACKENDS:
        folder = tmp_path_factory.mktemp(backend)
        trainer = reader_trainer(backend, backend)
        trainer.fit(ValidatedLM(), train_dataloaders=token_batches(2))
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(lightning_offload.strategy, "weights_location", lambda device: GPU_LOCATION)
            trainer.save_checkpoint(folder / "own.ckpt")
        consolidate(folder / "own.ckpt", folder / "consolidated.ckpt", lightning_file=True)
        on_host = torch.load(folder / "consolidated.ckpt", map_location="cpu", weights_only=False)
        tagged_on(GPU_LOCATION, on_host, folder / "file.ckpt")
        saved[backend] = {"own": folder / "own.ckpt", "file": folder / "file.ckpt",
                          "consolidated": folder / "consolidated.ckpt"}
    return saved


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
@pytest.mark.parametrize("map_location", sorted(MAP_LOCATIONS))
def test_load_from_checkpoint_places_a_folder_saved_on_the_gpu_as_lightnings_file_saved_there(
        saved_on_gpu, backend: str, map_location: str) -> None:
    paths = saved_on_gpu[backend]
    options = {"map_location": MAP_LOCATIONS[map_location]}
    from_file = loaded_or_error(paths["file"], **options)
    # On a machine without CUDA, Lightning's default maps the file onto the CPU and a map without the GPU refuses it.
    if not torch.cuda.is_available() and map_location == "dict_cpu":
        assert isinstance(from_file, RuntimeError) and "map_location" in str(from_file)
    assert_same_load(loaded_or_error(paths["own"], **options), from_file)


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_a_folder_saved_on_the_gpu_reads_as_torch_load_reads_lightnings_file_saved_there(saved_on_gpu,
                                                                                          backend: str) -> None:
    from lightning_offload.consolidation import lightning_checkpoint

    def read(load: Any, path: Path, **options: Any) -> Any:
        try:
            return load(path, weights_only=False, **options)["state_dict"]
        except Exception as error:
            return error

    paths = saved_on_gpu[backend]
    for options in ({}, {"map_location": {GPU_LOCATION: "cpu"}}):
        from_folder = read(lightning_checkpoint, paths["own"], **options)
        assert_same_load(from_folder, read(torch.load, paths["file"], **options))
    seen: dict[str, set[str]] = {}
    for form, path in paths.items():
        seen[form] = set()
        ValidatedLM.load_from_checkpoint(path, map_location=lambda storage, location, calls=seen[form]:
                                         calls.add(location) or storage)
    assert seen["own"] == seen["file"] == {GPU_LOCATION}


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
@pytest.mark.parametrize("map_location", sorted(MAP_LOCATIONS))
def test_the_lightning_file_consolidated_from_a_folder_saved_on_the_gpu_loads_as_lightnings_file_saved_there(
        saved_on_gpu, backend: str, map_location: str) -> None:
    paths = saved_on_gpu[backend]
    options = {"map_location": MAP_LOCATIONS[map_location]}
    assert_same_load(loaded_or_error(paths["consolidated"], **options), loaded_or_error(paths["file"], **options))


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_the_lightning_file_consolidated_from_a_folder_saved_on_the_gpu_tags_its_weights_there(saved_on_gpu,
                                                                                               backend: str) -> None:
    paths = saved_on_gpu[backend]
    weights, others = storage_tags(paths["consolidated"])
    assert weights == storage_tags(paths["file"])[0] == {GPU_LOCATION}
    assert others <= {"cpu"}  # Lightning's state beside the weights is read from the folder into host memory

    def read(path: Path, **options: Any) -> Any:
        try:
            return torch.load(path, weights_only=False, **options)["state_dict"]
        except Exception as error:
            return error

    # Without `map_location`, as Lightning's file of a GPU run, `torch.load` needs that GPU.
    for options in ({}, {"map_location": {GPU_LOCATION: "cpu"}}):
        assert_same_load(read(paths["consolidated"], **options), read(paths["file"], **options))


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_validate_reads_a_folder_saved_on_the_gpu_in_host_memory_as_lightning_reads_the_file(saved_on_gpu,
                                                                                             backend: str) -> None:
    validated = [reader_trainer("device", backend).validate(ValidatedLM(), token_batches(2, seed=1), ckpt_path=path,
                                                            verbose=False)[0]["val_loss"]
                 for path in saved_on_gpu[backend].values()]
    assert validated[0] == validated[1] == validated[2]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_a_folder_saved_by_a_cuda_run_loads_onto_its_gpu_as_lightnings_file_does(tmp_path, backend: str) -> None:
    trainer = one_epoch_trainer(backend, accelerator="gpu")
    trainer.fit(ValidatedLM(), train_dataloaders=token_batches(2))
    trainer.save_checkpoint(tmp_path / "own.ckpt")
    # Lightning's file of the same weights as a cuda run writes it: its storages on the run's GPU.
    consolidate(tmp_path / "own.ckpt", tmp_path / "consolidated.ckpt", lightning_file=True)
    on_gpu = torch.load(tmp_path / "consolidated.ckpt", map_location="cuda:0", weights_only=False)
    torch.save(on_gpu, tmp_path / "file.ckpt")

    for map_location in (None, "cpu", {"cuda:0": "cpu"}):
        from_folder = loaded_or_error(tmp_path / "own.ckpt", map_location=map_location)
        from_file = loaded_or_error(tmp_path / "file.ckpt", map_location=map_location)
        assert_same_load(from_folder, from_file)
        assert_same_load(loaded_or_error(tmp_path / "consolidated.ckpt", map_location=map_location), from_file)
        on = torch.device("cuda", 0) if map_location is None else torch.device("cpu")
        assert {value.device for value in from_folder.values()} == {on}


def a_card_too_small_for_no_offload(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planner sees a GPU on which every plan of the `device` backend misses the memory it needs and another
    backend's plan fits (roomy host memory)."""
    from lightning_offload.planner import Machine
    from lightning_offload.planner.budget import GIB
    from lightning_offload.planner.choose import SAFETY_MARGIN

    roomy = Machine(gpu_memory_gib=1000, host_memory_gib=1000)
    monkeypatch.setattr(Machine, "detect", classmethod(lambda cls, device=None, **budgets: roomy))
    measured = reader_trainer("auto", "auto", max_steps=1)
    measured.fit(ValidatedLM(), train_dataloaders=token_batches(2))
    needs = {}
    for candidate in measured.strategy.plan_report.candidates:
        offloads = candidate.plan.backend != "device"
        needs[offloads] = min(needs.get(offloads, candidate.memory.gpu_bytes), candidate.memory.gpu_bytes)
    assert needs[True] < needs[False]
    card = Machine(gpu_memory_gib=(needs[True] + needs[False]) / 2 / SAFETY_MARGIN / GIB, host_memory_gib=1000)
    monkeypatch.setattr(Machine, "detect", classmethod(lambda cls, device=None, **budgets: card))


@pytest.mark.parametrize("writer", ["auto", "host_adam", "stream"])
def test_validate_from_a_checkpoint_without_a_plan_takes_the_plan_the_planner_chooses(
        monkeypatch: pytest.MonkeyPatch, saved_once, writer: str) -> None:
    from lightning_offload.planner.record import saved_plan

    checkpoint = saved_once[writer]["own"]
    assert saved_plan(checkpoint) is None  # Lightning's own file, or a run that skipped the planner
    a_card_too_small_for_no_offload(monkeypatch)
    planned = reader_trainer("auto", "auto", max_steps=1)
    planned.fit(ValidatedLM(), train_dataloaders=token_batches(2))
    chosen = planned.strategy.plan_report.chosen.plan

    trainer = reader_trainer("auto", "auto")
    validated = trainer.validate(ValidatedLM(), token_batches(2, seed=1), ckpt_path=checkpoint, verbose=False)
    report = trainer.strategy.plan_report
    assert report is not None and trainer.strategy.plan == chosen and chosen.backend != "device"
    assert not any(c.fits for c in report.candidates if c.plan.backend == "device")
    plain = pl.Trainer(strategy="auto", precision="32-true", accelerator="cpu", devices=1, logger=False,
                       enable_progress_bar=False, enable_model_summary=False)
    from_file = plain.validate(ValidatedLM(), token_batches(2, seed=1), ckpt_path=saved_once[writer]["file"],
                               verbose=False)
    assert validated[0]["val_loss"] == pytest.approx(from_file[0]["val_loss"], rel=FOLLOWS_PLAIN_FP32_RTOL)


def test_validate_from_a_checkpoint_without_a_plan_is_refused_before_the_model_is_built_when_nothing_fits(
        monkeypatch: pytest.MonkeyPatch, saved_once) -> None:
    from lightning_offload.planner import Machine, PlanDoesNotFit

    tiny = Machine(gpu_memory_gib=0.01, host_memory_gib=0.01, unified=True)
    monkeypatch.setattr(Machine, "detect", classmethod(lambda cls, device=None, **budgets: tiny))
    module = ValidatedLM()
    with pytest.raises(PlanDoesNotFit, match=r"host RAM short by \d+\.\d GiB"):
        reader_trainer("auto", "host_adam").validate(module, token_batches(2, seed=1),
                                                     ckpt_path=saved_once["host_adam"]["own"], verbose=False)
    assert module.net is None


class KeysSeenLM(ValidatedLM):
    """ValidatedLM that remembers the keys of the checkpoint Lightning hands `on_load_checkpoint`."""

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.keys_seen = set(checkpoint)


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_a_folders_recorded_location_stays_out_of_the_checkpoint_lightning_hands_the_module(saved_on_gpu,
                                                                                            backend: str) -> None:
    from lightning_offload.consolidation import WEIGHTS_LOCATION_KEY

    validated, loaded = KeysSeenLM(), KeysSeenLM.load_from_checkpoint(saved_on_gpu[backend]["own"],
                                                                      map_location="cpu")
    reader_trainer(backend, backend).validate(validated, token_batches(2, seed=1),
                                              ckpt_path=saved_on_gpu[backend]["own"], verbose=False)
    assert "epoch" in validated.keys_seen and "epoch" in loaded.keys_seen
    assert WEIGHTS_LOCATION_KEY not in validated.keys_seen | loaded.keys_seen


def test_a_folder_saved_before_its_location_was_recorded_loads_as_saved_from_host_memory(tmp_path,
                                                                                          saved_on_gpu) -> None:
    import shutil

    from lightning_offload.consolidation import WEIGHTS_LOCATION_KEY

    older = tmp_path / "older.ckpt"
    shutil.copytree(saved_on_gpu["stream"]["own"], older)
    state = torch.load(older / "trainer.pt", weights_only=False)
    assert state.pop(WEIGHTS_LOCATION_KEY) == GPU_LOCATION
    torch.save(state, older / "trainer.pt")
    on_host = tmp_path / "on_host.ckpt"  # Lightning's file of its weights, tagged "cpu"
    tagged_on("cpu", torch.load(saved_on_gpu["stream"]["file"], map_location="cpu", weights_only=False), on_host)
    consolidate(older, tmp_path / "consolidated.ckpt", lightning_file=True)
    for map_location in MAP_LOCATIONS.values():
        from_file = loaded_or_error(on_host, map_location=map_location)
        assert_same_load(loaded_or_error(older, map_location=map_location), from_file)
        assert_same_load(loaded_or_error(tmp_path / "consolidated.ckpt", map_location=map_location), from_file)
