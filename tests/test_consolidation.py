"""`consolidate`: any backend's checkpoint as one plain fp32 state dict, written one tensor at a time."""

from __future__ import annotations

import pytest
import torch

from lightning_offload.consolidation import consolidate, fp32_tensors
from lightning_offload.saving import write_state_dict
from tests.conftest import SEQ_LEN, TinyLM
from tests.test_saving import assert_same_state_dict, sharing, storage_tags, tagged_on


def test_consolidate_names_a_wrong_folder(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not a `single_gpu_offload` checkpoint folder"):
        consolidate(tmp_path)


def whole_state_dict(checkpoint) -> dict:
    """The fp32 state dict of a checkpoint, built whole in memory as `consolidate` built it before it streamed."""
    from lightning_offload.backends import host_adam
    from lightning_offload.backends.stream.checkpoint import read_manifest, saved_buffers

    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
        return {name: value.float() if value.is_floating_point() else value for name, value in state.items()}
    if (checkpoint / "manifest.json").is_file():
        result = {}
        manifest = read_manifest(checkpoint)
        for entry in manifest["units"]:
            content = torch.load(checkpoint / entry["file"], weights_only=True)
            for names, weight in zip(entry["names"], content["weights"]):
                result.update(dict.fromkeys(names, weight.float()))
        buffers = saved_buffers(checkpoint, manifest) or {}
        return {**result, **{name: b.float() if b.is_floating_point() else b for name, b in buffers.items()}}
    if (checkpoint / host_adam.CHECKPOINT_FILE).is_file():
        state = host_adam.read_checkpoint(checkpoint)
        result = {}
        for names, (master, _, _) in zip(state["names"], host_adam.saved_parameters(state)):
            result.update(dict.fromkeys(names, master.clone()))
        return {**result, **state["buffers"]}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint)))


# One of each checkpoint format: Lightning's file (cast from bf16), the stream backend's units (bf16), host_adam's
# fp32 arena, DeepSpeed's fp32 partitions.
FORMATS = {
    "device": (dict(backend="device"), "bf16-true"),
    "stream": (dict(backend="stream", check_memory=False, resident_blocks=0, stream_outer=True, build_on_meta=False),
               "bf16-true"),
    "host_adam": (dict(backend="host_adam", check_memory=False, bucket_numel=3000, chunk_numel=700), "bf16-mixed"),
    "deepspeed": (dict(backend="deepspeed"), "32-true"),
}


def saved_checkpoint(tmp_path, backend: str, module=None, precision: str | None = None):
    from lightning_offload import SingleGPUOffloadStrategy
    from tests.conftest import fit

    options, format_precision = FORMATS[backend]
    _, trainer = fit(SingleGPUOffloadStrategy(**options), num_batches=2, precision=precision or format_precision,
                     module=module)
    trainer.save_checkpoint(tmp_path / "trained.ckpt")
    return tmp_path / "trained.ckpt"


# Past 2**24: neither bf16 nor fp32 holds it, so a count cast to either on the way out comes back changed.
FIRST_COUNT = 2**24 + 1


class CountingTinyLM(TinyLM):
    """TinyLM whose network holds persistent buffers of every kind, each changed by every step: a counter (int64),
    a position mask (bool) and a floating scale (bf16 under `bf16-true`)."""

    def configure_model(self) -> None:
        if self.net is None:
            super().configure_model()
            self.net.register_buffer("steps_seen", torch.tensor(FIRST_COUNT))
            self.net.register_buffer("kept_positions", torch.arange(SEQ_LEN) % 3 == 0)
            self.net.register_buffer("scale", torch.linspace(0.5, 1.5, SEQ_LEN))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        self.net.steps_seen += 1
        self.net.kept_positions.logical_not_()
        self.net.scale.mul_(2)
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("backend", sorted(FORMATS))
def test_consolidate_upcasts_floating_buffers_only(tmp_path, backend: str) -> None:
    module = CountingTinyLM()
    checkpoint = saved_checkpoint(tmp_path, backend, module, precision="bf16-true")
    trained = {name: buffer.detach().cpu() for name, buffer in module.named_buffers()}
    assert trained["net.steps_seen"] == FIRST_COUNT + len(module.losses)  # the count moved while training
    assert trained["net.scale"].dtype == torch.bfloat16
    consolidated = consolidate(checkpoint)
    for name in ("net.steps_seen", "net.kept_positions"):
        assert consolidated[name].dtype == trained[name].dtype and torch.equal(consolidated[name], trained[name])
    assert consolidated["net.scale"].dtype == torch.float32
    assert torch.equal(consolidated["net.scale"], trained["net.scale"].float())


@pytest.mark.parametrize("backend", sorted(FORMATS))
def test_consolidate_writes_the_whole_state_dict_one_tensor_at_a_time(tmp_path, backend: str) -> None:
    from tests.conftest import peak_and_final_allocated_bytes

    checkpoint = saved_checkpoint(tmp_path, backend)
    expected = whole_state_dict(checkpoint)
    tensor_bytes = {value.untyped_storage().data_ptr(): value.numel() * 4 for value in expected.values()}
    largest, total = max(tensor_bytes.values()), sum(tensor_bytes.values())

    # Reading maps one file at a time, which the profiler counts as allocated; the largest is the "one shard".
    files = [checkpoint] if checkpoint.is_file() else [f for f in checkpoint.rglob("*") if f.is_file()]
    largest_file = max(f.stat().st_size for f in files)
    held = 0
    if backend == "deepspeed":  # names in the model's order: a tied weight is held from its first name to its last
        held = sum(tensor_bytes[expected[names[0]].untyped_storage().data_ptr()] for names in sharing(expected)
                   if len(names) > 1)
    assert total > held + largest  # the whole model held would exceed the bound below
    # The backend's reader and the writer, as `consolidate` runs them (it then maps the file written, to return it).
    peak, _ = peak_and_final_allocated_bytes(
        lambda: write_state_dict(tmp_path / "streamed.pt", fp32_tensors(checkpoint)))
    assert peak <= largest_file + held + largest
    assert_same_state_dict(torch.load(tmp_path / "streamed.pt", weights_only=True), expected)
    returned = consolidate(checkpoint, tmp_path / "model.pt")
    assert_same_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), expected)
    assert_same_state_dict(returned, expected)
    assert_same_state_dict(consolidate(checkpoint), expected)  # without a file: built in memory


def test_consolidate_prefix_that_matches_nothing_writes_nothing(tmp_path) -> None:
    checkpoint = saved_checkpoint(tmp_path, "device")
    with pytest.raises(ValueError, match="No name .* starts with `prefix='model.'`"):
        consolidate(checkpoint, tmp_path / "model.pt", prefix="model.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trained.ckpt"]
    state_dict = consolidate(checkpoint, tmp_path / "model.pt", prefix="net.")
    assert state_dict and all(not name.startswith("net.") for name in state_dict)


def test_deepspeed_buffers_keep_their_dtype_from_a_reader_that_casts_them(tmp_path, monkeypatch) -> None:
    import deepspeed.utils.zero_to_fp32 as zero_to_fp32

    from lightning_offload.backends.deepspeed import saved_weights

    module = CountingTinyLM()
    checkpoint = saved_checkpoint(tmp_path, "deepspeed", module)
    trained = {name: buffer.detach().cpu() for name, buffer in module.named_buffers()}
    read = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint

    def casting_buffers(*args, **kwargs):  # as DeepSpeed 0.19.6's reader gives them
        return {name: value.float() if name in trained else value for name, value in read(*args, **kwargs).items()}

    monkeypatch.setattr(zero_to_fp32, "get_fp32_state_dict_from_zero_checkpoint", casting_buffers)
    consolidated = consolidate(checkpoint)
    saved = {saved.names[0]: saved for saved in saved_weights(checkpoint)}
    for name in ("net.steps_seen", "net.kept_positions"):
        assert consolidated[name].dtype == trained[name].dtype and torch.equal(consolidated[name], trained[name])
        assert saved[name].dtype == trained[name].dtype and torch.equal(saved[name].load(), trained[name])


@pytest.mark.parametrize("location", ["cpu", "cuda:0"])
def test_lightnings_file_written_from_lightnings_file_keeps_where_its_weights_were(tmp_path, location: str) -> None:
    source = tmp_path / "source.ckpt"
    tagged_on(location, torch.load(saved_checkpoint(tmp_path, "device"), map_location="cpu", weights_only=False),
              source)
    consolidate(source, tmp_path / "lightning.ckpt", lightning_file=True)
    assert storage_tags(tmp_path / "lightning.ckpt")[0] == {location}
    # The plain state dict is in host memory wherever the run was: `load_state_dict(torch.load(path))` reads it.
    consolidate(source, tmp_path / "state_dict.pt")
    assert {t.device for t in torch.load(tmp_path / "state_dict.pt", weights_only=True).values()} == {
        torch.device("cpu")}

