"""`lightning_offload.pretrained`: a Hugging Face checkpoint loaded under every backend that runs on the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_offload
from lightning_offload import SingleGPUOffloadStrategy
from tests.backends.stream.test_units import AtStart, assert_started_as_under_auto, started, stream
from tests.conftest import VOCAB, fit, token_batches

transformers = pytest.importorskip("transformers")

# Every backend on the CPU, fp32 weights: the first step's loss is the checkpoint's, to float rounding.
CPU_BACKENDS = {
    "device": {},
    "gpu_8bit": {},
    "host_adam": dict(check_memory=False, bucket_numel=3000, chunk_numel=700),
    "deepspeed": {},
    "fsdp": {},
    "stream": dict(check_memory=False, resident_blocks=0, stream_outer=True),
    "stream_built_in_host_memory": dict(check_memory=False, resident_blocks=0, build_on_meta=False),
}
SAME_WEIGHTS_RTOL = 1e-6


def tiny_config(arch: str) -> Any:
    # Weights drawn wider than usual, so a model that kept its random initialisation has a clearly other loss.
    if arch == "llama":
        return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                        tie_word_embeddings=True, initializer_range=0.3)
    return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                   initializer_range=0.3, bos_token_id=0, eos_token_id=0,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def save_tiny(folder: Path, arch: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0,
              max_shard_size: str | None = None, **config_overrides: Any) -> Path:
    torch.manual_seed(seed)
    config = tiny_config(arch)
    config.update(config_overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return folder


def reference_loss(folder: Path, tokens: torch.Tensor, dtype: torch.dtype = torch.float32) -> float:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    with torch.no_grad():
        return model(input_ids=tokens, labels=tokens).loss.item()


class FineTune(pl.LightningModule):
    """A causal LM from a checkpoint folder, built in `configure_model` by `load(folder)`."""

    def __init__(self, folder: Path, load: Any = lightning_offload.pretrained, lr: float = 1e-3) -> None:
        super().__init__()
        self.folder, self.load, self.lr = folder, load, lr
        self.model: torch.nn.Module | None = None
        self.losses: list[float] = []

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self.load(self.folder)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch[0], labels=batch[0]).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def first_tokens(num_batches: int) -> torch.Tensor:
    return next(iter(token_batches(num_batches)))[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("backend", sorted(CPU_BACKENDS))
def test_first_loss_is_the_checkpoints_under_every_cpu_backend(tmp_path: Path, backend: str, arch: str) -> None:
    folder = save_tiny(tmp_path / arch, arch)
    options = CPU_BACKENDS[backend]
    strategy = SingleGPUOffloadStrategy(backend=backend.removesuffix("_built_in_host_memory"), **options)
    module, _ = fit(strategy, num_batches=2, module=FineTune(folder))
    expected = reference_loss(folder, first_tokens(2))
    other_init = reference_loss(save_tiny(tmp_path / "other", arch, seed=1), first_tokens(2))
    assert abs(other_init - expected) > 100 * SAME_WEIGHTS_RTOL * expected  # the check below can tell them apart
    assert module.losses[0] == pytest.approx(expected, rel=SAME_WEIGHTS_RTOL)


@pytest.mark.parametrize("source_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sharded_checkpoint_is_cast_on_the_way(tmp_path: Path, source_dtype: torch.dtype) -> None:
    folder = save_tiny(tmp_path / "half", dtype=source_dtype, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    module, _ = fit(SingleGPUOffloadStrategy(backend="device"), num_batches=1, module=FineTune(folder))
    assert module.losses[0] == pytest.approx(reference_loss(folder, first_tokens(1)), rel=SAME_WEIGHTS_RTOL)
    assert all(p.dtype == torch.float32 for p in module.model.parameters())


def test_tied_weights_stay_tied(tmp_path: Path) -> None:
    model = lightning_offload.pretrained(save_tiny(tmp_path / "llama"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
    torch.testing.assert_close(model.lm_head.weight, reference.lm_head.weight, rtol=0, atol=0)


def test_bf16_true_builds_bf16_weights_rounded_from_the_checkpoint(tmp_path: Path) -> None:
    folder = save_tiny(tmp_path / "llama")
    # lr=0 leaves the weights as loaded, to compare with those `from_pretrained` rounds to bf16.
    module, _ = fit(SingleGPUOffloadStrategy(backend="device"), num_batches=1, module=FineTune(folder, lr=0.0),
                    precision="bf16-true")
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    for (name, loaded), expected in zip(module.model.named_parameters(), reference.parameters(), strict=True):
        assert loaded.dtype == torch.bfloat16
        assert torch.equal(loaded, expected), name


class BuiltInHostMemory:
    """Builds the model in host memory whatever the default device, as an engine builds it on its GPU inside
    `torch.device("cuda")`: the weights are read with the default device elsewhere than their place."""

    @staticmethod
    def from_config(config: Any, **kwargs: Any) -> torch.nn.Module:
        with torch.device("cpu"):
            return transformers.AutoModelForCausalLM.from_config(config, **kwargs)


def test_loading_under_another_default_device_stages_each_cast_in_host_memory(tmp_path: Path) -> None:
    # A bf16 checkpoint into fp32 weights: each tensor is staged for the cast.
    folder = save_tiny(tmp_path / "llama", dtype=torch.bfloat16)
    with torch.device("meta"):
        model = lightning_offload.pretrained(folder, BuiltInHostMemory, dtype=torch.float32)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for (name, loaded), expected in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert loaded.device.type == "cpu" and torch.equal(loaded, expected), name


def test_mismatched_checkpoint_names_what_is_missing_and_unexpected(tmp_path: Path) -> None:
    llama, gpt2 = save_tiny(tmp_path / "llama"), save_tiny(tmp_path / "gpt2", "gpt2")
    (llama / "model.safetensors").replace(tmp_path / "llama.safetensors")
    (gpt2 / "model.safetensors").rename(llama / "model.safetensors")
    with pytest.raises(ValueError, match=r"parameter\(s\) missing from it \(model\.embed_tokens\.weight.*"
                                         r"tensor\(s\) the model does not have \(transformer\..*strict=False"):
        lightning_offload.pretrained(llama)
    with pytest.warns(UserWarning, match="keep their initialisation"):
        model = lightning_offload.pretrained(llama, strict=False)
    assert torch.isfinite(model.model.embed_tokens.weight).all()


def test_folder_without_safetensors_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        lightning_offload.pretrained(tmp_path)


def from_pretrained(folder: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


@pytest.mark.parametrize("backend", sorted(CPU_BACKENDS))
def test_from_pretrained_in_configure_model_under_every_cpu_backend(tmp_path: Path, backend: str) -> None:
    folder = save_tiny(tmp_path / "llama")
    strategy = SingleGPUOffloadStrategy(backend=backend.removesuffix("_built_in_host_memory"), **CPU_BACKENDS[backend])
    if backend == "stream":  # builds on the meta device, where `from_pretrained` refuses to load
        with pytest.raises(ValueError, match=r"lightning_offload\.pretrained\(path\)`.*build_on_meta=False"):
            fit(strategy, num_batches=2, module=FineTune(folder, load=from_pretrained))
        return
    module, _ = fit(strategy, num_batches=2, module=FineTune(folder, load=from_pretrained))
    assert module.losses[0] == pytest.approx(reference_loss(folder, first_tokens(2)), rel=SAME_WEIGHTS_RTOL)


@pytest.mark.parametrize("source_dtype", [torch.float32, torch.bfloat16])
def test_loading_holds_the_model_and_at_most_one_staged_tensor(tmp_path: Path, source_dtype: torch.dtype) -> None:
    from tests.conftest import peak_and_final_allocated_bytes

    # Untied: a tied output layer is built, then tied away, before any weight is read.
    folder = save_tiny(tmp_path / "llama", dtype=source_dtype, max_shard_size="20KB", tie_word_embeddings=False)
    loaded = []
    peak, final = peak_and_final_allocated_bytes(lambda: loaded.append(lightning_offload.pretrained(folder)))
    model_bytes = sum(t.numel() * t.element_size() for t in [*loaded[0].parameters(), *loaded[0].buffers()])
    largest_source = max(p.numel() for p in loaded[0].parameters()) * source_dtype.itemsize
    assert final >= model_bytes
    # fp32 reads land in the parameters themselves; a bf16 source is staged one tensor at a time for the cast.
    assert peak - final <= (0 if source_dtype == torch.float32 else largest_source)


# ---------------------------------------------------------------------------------------------- a module with buffers
class ScaledLinear(nn.Linear):
    """A Linear with a persistent buffer: its initialiser, the model's `_init_weights`, draws its weight at random."""

    def __init__(self, features: int) -> None:
        super().__init__(features, features)
        self.register_buffer("output_scale", torch.ones(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.output_scale


class NormBlock(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.linear = ScaledLinear(features)
        self.norm = nn.BatchNorm1d(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.norm(self.linear(x)))


class NormNet(transformers.PreTrainedModel):
    """A `transformers` model whose blocks hold modules with weights and buffers (a BatchNorm's running statistics);
    a Llama config carries its sizes, so that `AutoConfig` reads its checkpoint."""

    config_class = transformers.LlamaConfig

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(NormBlock(config.hidden_size) for _ in range(config.num_hidden_layers))
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> NormNet:
        return cls._from_config(config, **kwargs)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids.flatten())  # BatchNorm1d normalises the features of (rows, features)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.head(hidden).unflatten(0, input_ids.shape)


def save_norm_net(folder: Path) -> Path:
    """A checkpoint whose buffers, and norms' weights, are far from what their initialisers set."""
    torch.manual_seed(0)
    model = NormNet(tiny_config("llama"))
    with torch.no_grad():
        for layer in model.layers:
            for tensor in (layer.norm.weight, layer.norm.bias, layer.norm.running_mean):
                tensor.normal_()
            layer.norm.running_var.uniform_(0.5, 2.0)
            layer.norm.num_batches_tracked.fill_(7)
            layer.linear.output_scale.uniform_(0.5, 2.0)
    model.save_pretrained(folder)
    return folder


class FineTuneNormNet(AtStart):
    def __init__(self, folder: Path, strict: bool = True) -> None:
        super().__init__()
        self.folder, self.strict = folder, strict
        self.model: nn.Module | None = None

    def configure_model(self) -> None:
        if self.model is None:
            self.model = lightning_offload.pretrained(self.folder, NormNet, strict=self.strict)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        loss = F.cross_entropy(self.model(inputs).flatten(0, 1), targets.flatten())
        self.losses.append(loss.item())
        return loss

    def train_dataloader(self) -> Any:
        return token_batches(2)


# On a GPU the initialisers draw from the GPU's generator, which must be left as it was too.
@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_stream_keeps_the_loaded_weights_of_a_module_with_buffers_and_the_random_state(tmp_path: Path,
                                                                                      accelerator: str) -> None:
    folder = save_norm_net(tmp_path / "norm_net")
    checkpoint = NormNet.from_pretrained(folder).state_dict()
    norm = checkpoint["layers.0.norm.weight"]
    assert not torch.equal(norm, torch.ones_like(norm))  # unlike what the norm's initialiser sets
    auto = started("auto", FineTuneNormNet(folder), accelerator)
    module = started(stream(), FineTuneNormNet(folder), accelerator)
    for name, expected in checkpoint.items():
        assert torch.equal(module.state_at_start[f"model.{name}"].cpu(), expected), name
    assert_started_as_under_auto(module, auto)


def test_stream_keeps_the_loaded_buffers_of_a_module_its_initialiser_runs_on(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = save_norm_net(tmp_path / "norm_net")
    checkpoint = load_file(folder / "model.safetensors")
    # Without its bias in the checkpoint, the norm is initialised by `_init_weights`, which resets its statistics too.
    del checkpoint["layers.0.norm.bias"]
    save_file(checkpoint, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="layers.0.norm.bias"):
        module = started(stream(), FineTuneNormNet(folder, strict=False))
    buffers = [name for name, _ in NormNet(tiny_config("llama")).named_buffers()]
    assert "layers.0.norm.running_mean" in buffers
    for name in buffers:
        assert torch.equal(module.state_at_start[f"model.{name}"], checkpoint[name]), name
