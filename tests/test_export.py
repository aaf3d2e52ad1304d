"""`lightning_offload.export_hf`: any CPU backend's checkpoint out as a folder `from_pretrained` loads."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import lightning_offload
from lightning_offload import SingleGPUOffloadStrategy
from lightning_offload._safetensors import Reader, read_folder
from lightning_offload.export import main
from tests.conftest import fit, token_batches
from tests.test_pretrained import CPU_BACKENDS, FineTune, save_tiny, tiny_config

transformers = pytest.importorskip("transformers")
# Past 2**24: neither bf16 nor fp32 holds it, so a count cast to either on the way out comes back changed.
FIRST_COUNT = 2**24 + 1


class CountingLlamaConfig(transformers.LlamaConfig):
    model_type = "counting_llama"


class CountingLlama(transformers.LlamaForCausalLM):
    """A causal LM with persistent non-floating buffers: a step counter (int64) and a position mask (bool)."""

    config_class = CountingLlamaConfig

    def __init__(self, config: CountingLlamaConfig) -> None:
        super().__init__(config)
        self.register_buffer("steps_seen", torch.tensor(FIRST_COUNT))
        self.register_buffer("kept_positions", torch.arange(config.max_position_embeddings) % 3 == 0)

    def forward(self, *args, **kwargs):
        if self.training:
            self.steps_seen += 1
        return super().forward(*args, **kwargs)


transformers.AutoConfig.register(CountingLlamaConfig.model_type, CountingLlamaConfig, exist_ok=True)
transformers.AutoModelForCausalLM.register(CountingLlamaConfig, CountingLlama, exist_ok=True)


def save_counting_tiny(folder: Path) -> Path:
    torch.manual_seed(0)
    options = tiny_config("llama").to_diff_dict()
    options.pop("model_type")
    CountingLlama(CountingLlamaConfig(**options)).save_pretrained(folder)
    return folder


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def train_and_save(tmp_path: Path, backend: str, arch: str = "llama",
                   save_pretrained: Callable[[Path], Path] | None = None) -> tuple[FineTune, Path, Path]:
    folder = (save_pretrained or (lambda path: save_tiny(path, arch)))(tmp_path / "pretrained")
    strategy = SingleGPUOffloadStrategy(backend=backend.removesuffix("_built_in_host_memory"), **CPU_BACKENDS[backend])
    # A large step, so trained weights are far from the pretrained ones and an export of those would show.
    module, trainer = fit(strategy, num_batches=2, module=FineTune(folder, lr=1e-2))
    checkpoint = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(checkpoint)
    return module, folder, checkpoint


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fp32_export_reproduces_the_trained_modules_logits_exactly(tmp_path: Path, arch: str) -> None:
    module, folder, checkpoint = train_and_save(tmp_path, "device", arch)
    out = lightning_offload.export_hf(checkpoint, tmp_path / "hf", config=folder, dtype="fp32")
    exported = transformers.AutoModelForCausalLM.from_pretrained(out)
    tokens = next(iter(token_batches(1)))[0]
    module.model.eval()
    assert torch.equal(logits(exported, tokens), logits(module.model, tokens))
    pretrained = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert not torch.allclose(logits(pretrained, tokens), logits(exported, tokens), rtol=1e-3, atol=0)


@pytest.mark.parametrize("backend", sorted(CPU_BACKENDS))
def test_every_cpu_backends_checkpoint_exports_its_weights(tmp_path: Path, backend: str) -> None:
    _, folder, checkpoint = train_and_save(tmp_path, backend)
    out = lightning_offload.export_hf(checkpoint, tmp_path / "hf", config=folder, dtype="fp32")
    exported = transformers.AutoModelForCausalLM.from_pretrained(out)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder)
    # The plain state dict `consolidate` gives, loaded by torch alone, is the same model.
    reference.load_state_dict(lightning_offload.consolidate(checkpoint, prefix="model."), strict=False)
    for (name, value), expected in zip(exported.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(value, expected.float()), name


@pytest.mark.parametrize("backend", sorted(CPU_BACKENDS))
def test_integer_and_bool_buffers_keep_their_own_dtype_and_values(tmp_path: Path, backend: str) -> None:
    module, folder, checkpoint = train_and_save(tmp_path, backend, save_pretrained=save_counting_tiny)
    trained = {name: module.model.get_buffer(name).detach().cpu() for name in ("steps_seen", "kept_positions")}
    assert trained["steps_seen"] == FIRST_COUNT + len(module.losses)  # the count moved while training
    for dtype in ("bf16", "fp32"):
        out = lightning_offload.export_hf(checkpoint, tmp_path / dtype, config=folder, dtype=dtype)
        entries, reader = read_folder(out), Reader()
        exported = transformers.AutoModelForCausalLM.from_pretrained(out)
        for name, value in trained.items():
            assert entries[name].dtype == value.dtype, (dtype, name)
            assert torch.equal(reader.read(entries[name]), value), (dtype, name)
            assert torch.equal(exported.get_buffer(name), value), (dtype, name)
        reader.close()
    consolidated = lightning_offload.consolidate(checkpoint, prefix="model.")
    for name, value in trained.items():
        assert consolidated[name].dtype == value.dtype and torch.equal(consolidated[name], value), name
    assert all(v.dtype == torch.float32 for v in consolidated.values() if v.is_floating_point())


def test_a_checkpoint_that_does_not_exist_is_named_as_missing(tmp_path: Path) -> None:
    folder = save_tiny(tmp_path / "pretrained")
    with pytest.raises(FileNotFoundError, match="trained.ckpt' does not exist"):
        lightning_offload.export_hf(tmp_path / "trained.ckpt", tmp_path / "hf", config=folder)
    assert not (tmp_path / "hf").exists()


def test_bf16_sharded_export_rounds_each_weight_once(tmp_path: Path) -> None:
    module, folder, checkpoint = train_and_save(tmp_path, "device")
    out = lightning_offload.export_hf(checkpoint, tmp_path / "hf", config=folder, max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "lm_head.weight" not in index["weight_map"]  # tied: written once, as `save_pretrained` does
    assert (out / "generation_config.json").is_file()
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    trained = dict(module.model.named_parameters())
    for name, value in exported.named_parameters():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, trained[name].detach().to(torch.bfloat16)), name


def test_command_line_writes_the_same_folder(tmp_path: Path) -> None:
    _, folder, checkpoint = train_and_save(tmp_path, "device")
    main([str(checkpoint), str(tmp_path / "cli"), "--config", str(folder), "--dtype", "fp32"])
    api = lightning_offload.export_hf(checkpoint, tmp_path / "api", config=folder, dtype="fp32")
    assert (tmp_path / "cli" / "model.safetensors").read_bytes() == (api / "model.safetensors").read_bytes()


def test_consolidate_prefix_that_matches_nothing_is_refused(tmp_path: Path) -> None:
    _, _, checkpoint = train_and_save(tmp_path, "device")
    with pytest.raises(ValueError, match="prefix='net.'"):
        lightning_offload.consolidate(checkpoint, prefix="net.")


def test_export_writes_one_tensor_at_a_time(tmp_path: Path) -> None:
    from lightning_offload.export import _write_shards, saved_tensors
    from tests.conftest import peak_and_final_allocated_bytes

    module, _, checkpoint = train_and_save(tmp_path, "device")
    largest = max(p.numel() for p in module.parameters()) * torch.bfloat16.itemsize
    model_bytes = sum(p.numel() for p in module.parameters()) * torch.bfloat16.itemsize
    assert largest < model_bytes / 4  # so one tensor at a time and the whole model are told apart
    # Mapping the checkpoint's file is outside the measurement (the profiler counts the mapping as allocated).
    layout = [(saved.names[0], torch.bfloat16, saved.shape, saved) for saved in saved_tensors(checkpoint)]
    (tmp_path / "out").mkdir()
    peak, _ = peak_and_final_allocated_bytes(lambda: _write_shards(
        tmp_path / "out", layout, lambda _, saved: saved.load().to(torch.bfloat16), 2**30))
    assert peak <= largest  # each weight cast to bf16 is written and freed before the next


def test_stream_checkpoint_is_mapped_one_unit_file_at_a_time(tmp_path: Path) -> None:
    from tests.conftest import peak_and_final_allocated_bytes

    module, folder, checkpoint = train_and_save(tmp_path, "stream")
    unit_files = sorted(checkpoint.glob("unit_*.pt"))
    largest_file = max(f.stat().st_size for f in unit_files)
    largest = max(p.numel() for p in module.parameters()) * torch.bfloat16.itemsize
    assert sum(f.stat().st_size for f in unit_files) > largest_file + largest  # every file mapped at once would show
    # The profiler counts a mapped file as allocated: at most one unit's file, and one weight cast to bf16.
    peak, _ = peak_and_final_allocated_bytes(
        lambda: lightning_offload.export_hf(checkpoint, tmp_path / "hf", config=folder))
    assert peak <= largest_file + largest
