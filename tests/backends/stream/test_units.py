"""Building a model's parameters on the meta device and materialising them unit by unit: the module's state (its
buffers too) and the user's random numbers come out as under `strategy="auto"` (a checkpoint's weights too:
tests/test_pretrained.py)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_offload import SingleGPUOffloadStrategy

FEATURES, BATCH, SEED = 8, 4, 0


class CachedRowNorms(nn.Module):
    """A weight drawn at random with, beside it, a buffer computed from it: `reset_parameters` sets both."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(features, features))
        self.register_buffer("row_norms", torch.empty(features), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)
        with torch.no_grad():
            self.row_norms.copy_(self.weight.norm(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.weight / self.row_norms[:, None]).T


class Block(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, features)
        self.norm = nn.BatchNorm1d(features)
        self.cached = CachedRowNorms(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cached(torch.relu(self.norm(self.linear(x))))


class AtStart(pl.LightningModule):
    """Records its parameters, buffers and the global random states when training starts, and every loss."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []
        self.state_at_start: dict[str, torch.Tensor] = {}
        self.random_states_at_start: list[torch.Tensor] = []
        self.net: nn.Module | None = None  # built in `configure_model`

    def on_train_start(self) -> None:
        self.state_at_start = {name: t.detach().clone() for name, t in [*self.named_parameters(),
                                                                          *self.named_buffers()]}
        self.random_states_at_start = [torch.get_rng_state()]
        if self.device.type == "cuda":
            self.random_states_at_start.append(torch.cuda.get_rng_state(self.device))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


class BatchNormNet(AtStart):
    def configure_model(self) -> None:
        if self.net is None:
            self.net = nn.Sequential(Block(FEATURES), Block(FEATURES), nn.Linear(FEATURES, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        features, targets = batch
        loss = F.mse_loss(self.net(features), targets)
        self.losses.append(loss.item())
        return loss

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(SEED)
        features = torch.randn(2 * BATCH, FEATURES, generator=generator)
        return DataLoader(TensorDataset(features, features.sum(dim=1, keepdim=True)), batch_size=BATCH)


def stream(initial_weights: str = "as_auto") -> SingleGPUOffloadStrategy:
    # Every unit streamed: each gets its weights in host memory; the CPU stands in for the GPU.
    return SingleGPUOffloadStrategy(backend="stream", check_memory=False, resident_blocks=0, stream_outer=True,
                                    initial_weights=initial_weights)


def started(strategy: Any, module: AtStart, accelerator: str = "cpu") -> AtStart:
    """`module` after a seeded two-step fit under `strategy`."""
    pl.seed_everything(SEED, verbose=False)
    trainer = pl.Trainer(strategy=strategy, accelerator=accelerator, devices=1, max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    return module


def assert_started_as_under_auto(module: AtStart, auto: AtStart) -> None:
    assert module.state_at_start.keys() == auto.state_at_start.keys()
    for name, expected in auto.state_at_start.items():  # a streamed weight lives in host memory, auto's on the GPU
        assert torch.equal(module.state_at_start[name].cpu(), expected.cpu()), name
    assert len(module.random_states_at_start) == len(auto.random_states_at_start)
    for state, expected in zip(module.random_states_at_start, auto.random_states_at_start):
        assert torch.equal(state, expected)
    assert module.losses[0] == auto.losses[0]


def test_a_layer_initialising_its_weights_and_buffers_together_is_initialised_once() -> None:
    auto = started("auto", BatchNormNet())
    module = started(stream(), BatchNormNet())
    assert_started_as_under_auto(module, auto)


class BuiltWithoutDrawing(BatchNormNet):
    def configure_model(self) -> None:
        with torch.random.fork_rng():
            super().configure_model()


def test_on_device_weights_leave_the_random_generator_as_configure_model_found_it() -> None:
    auto = started("auto", BatchNormNet())
    module = started(stream("on_device"), BatchNormNet())
    assert torch.equal(module.random_states_at_start[0], started("auto", BuiltWithoutDrawing()).random_states_at_start[0])
    assert not torch.equal(module.random_states_at_start[0], auto.random_states_at_start[0])
    assert all(not p.is_meta for p in module.parameters())
    norms = module.state_at_start["net.0.cached.row_norms"]
    assert torch.equal(norms, module.state_at_start["net.0.cached.weight"].norm(dim=1))  # computed with its weight


class ScaledByConstants(nn.Module):
    """A weight beside a table its constructor computes once (as a rotary embedding's frequencies are), which its
    `reset_parameters` leaves alone."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(features, features))
        self.register_buffer("scale", torch.linspace(0.5, 2.0, features), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.weight.T) * self.scale


class ScaledBlock(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, features)
        self.scaled = ScaledByConstants(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scaled(torch.tanh(self.linear(x)))


class ConstantsNet(BatchNormNet):
    def configure_model(self) -> None:
        if self.net is None:
            self.net = nn.Sequential(ScaledBlock(FEATURES), ScaledBlock(FEATURES), nn.Linear(FEATURES, 1))


def test_a_buffer_only_the_constructor_computes_keeps_its_values() -> None:
    auto = started("auto", ConstantsNet())
    module = started(stream(), ConstantsNet())
    assert_started_as_under_auto(module, auto)


class TinyLlama(AtStart):
    def configure_model(self) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        if self.net is None:
            config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8)
            self.net = LlamaForCausalLM(config)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        loss = self.net(input_ids=tokens, labels=tokens).loss
        self.losses.append(loss.item())
        return loss

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(SEED)
        return DataLoader(TensorDataset(torch.randint(0, 32, (2 * BATCH, 8), generator=generator)), batch_size=BATCH)


def test_a_llama_built_from_its_config_has_the_rotary_frequencies_of_auto() -> None:
    pytest.importorskip("transformers")
    auto = started("auto", TinyLlama())
    module = started(stream(), TinyLlama())
    buffers = [name for name, _ in auto.named_buffers()]
    assert buffers  # the rotary frequencies
    for name in buffers:
        assert torch.equal(module.state_at_start[name], auto.state_at_start[name]), name


class RandomProjection(nn.Module):
    """A buffer drawn at random, by the constructor and by `reset_parameters`: the build cannot know it."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.register_buffer("projection", torch.empty(in_features, out_features), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.projection


class ProjectedNet(BatchNormNet):
    def configure_model(self) -> None:
        if self.net is None:
            # Drawn after every weight: auto draws it from where the weights' numbers end, as the engine does.
            self.net = nn.Sequential(Block(FEATURES), Block(FEATURES), nn.Linear(FEATURES, FEATURES),
                                     RandomProjection(FEATURES, 1))


def test_a_buffer_drawn_at_random_is_drawn_by_its_initialiser_after_the_weights() -> None:
    auto = started("auto", ProjectedNet())
    module = started(stream(), ProjectedNet())
    assert module.state_at_start.keys() == auto.state_at_start.keys()
    for name, expected in auto.state_at_start.items():
        assert torch.equal(module.state_at_start[name], expected), name
    assert module.losses[0] == auto.losses[0]
    # The engine draws it with the global generator's state kept, where auto's draw advances it: not compared.
