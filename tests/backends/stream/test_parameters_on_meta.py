"""`parameters_on_meta`: the `stream` backend's build of `configure_model`, parameters on meta, buffers for real."""

from __future__ import annotations

import psutil
import pytest
import torch
from torch import nn

from lightning_offload.backends.stream.parameters_on_meta import init_record, parameters_on_meta
from tests.backends.stream.test_units import Block, ScaledByConstants

FEATURES = 8


class Tagged(nn.Parameter):
    """A parameter class of the user's, with an attribute set on the instance."""


class DrawsInItsConstructor(nn.Module):
    """Parameters and a buffer drawn from the global generator in every way a constructor draws them."""

    def __init__(self) -> None:
        super().__init__()
        self.drawn = nn.Parameter(torch.randn(FEATURES, FEATURES) * 0.02)
        self.filled = nn.Parameter(torch.empty(FEATURES).normal_())
        self.register_buffer("noise", torch.randn(FEATURES))


def test_parameters_go_to_meta_keeping_their_class_attributes_and_requires_grad() -> None:
    def build() -> nn.Linear:
        linear = nn.Linear(FEATURES, FEATURES)
        linear.weight = Tagged(torch.empty(FEATURES, FEATURES), requires_grad=False)
        linear.weight.no_decay = True
        return linear

    with parameters_on_meta():
        linear = build()
    assert type(linear.weight) is Tagged and linear.weight.is_meta
    assert linear.weight.no_decay and not linear.weight.requires_grad
    assert linear.bias.is_meta and linear.bias.requires_grad
    assert not nn.Linear(1, 1).weight.is_meta  # the patch is gone on exit


def test_buffers_are_what_their_constructors_compute() -> None:
    with parameters_on_meta():
        scaled, block = ScaledByConstants(FEATURES), Block(FEATURES)
    assert scaled.weight.is_meta
    assert torch.equal(scaled.scale, ScaledByConstants(FEATURES).scale)
    for name, buffer in Block(FEATURES).named_buffers():
        if name != "cached.row_norms":
            assert torch.equal(block.get_buffer(name), buffer), name
    # Computed from a parameter whose weights are not drawn yet: its module's initialiser computes it.
    assert block.cached.row_norms.is_meta


class InitialisedEveryWay(nn.Module):
    """Parameters initialised in the ways models do it: `reset_parameters`, `torch.nn.init`, writes into views and
    `.data`, a generator of the user's, a cast of the whole module."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(FEATURES, FEATURES)
        self.embedding = nn.Embedding(FEATURES, FEATURES, padding_idx=0)
        self.norm = nn.LayerNorm(FEATURES)
        self.orthogonal = nn.Parameter(torch.empty(FEATURES, 2 * FEATURES))
        nn.init.orthogonal_(self.orthogonal)
        self.truncated = nn.Parameter(torch.empty(FEATURES))
        nn.init.trunc_normal_(self.truncated, std=0.02, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            self.linear.weight.data[1:3].normal_(std=0.5)
            self.linear.weight.T[0] = torch.arange(FEATURES, dtype=torch.float32)
            self.linear.bias.mul_(2.0).add_(1.0)
        self.replaced = nn.Parameter(torch.empty(2))
        self.replaced.data = torch.randn(FEATURES)
        self.doubled = nn.Parameter(torch.empty(FEATURES))
        with torch.no_grad():
            self.doubled.copy_(self.truncated * 2)  # from another parameter's weights
            self.truncated.add_(1.0)  # after they were read
        self.register_buffer("row_norms", self.orthogonal.norm(dim=1))


class ReassignedAsNewParameters(nn.Module):
    """Initialised weights re-registered as new parameters: their own storage (`nn.Parameter(p.data)`) and a
    converted copy, as peft upcasts its bf16 adapters (`nn.Parameter(p.data.to(torch.float32))`)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(FEATURES, FEATURES, dtype=torch.bfloat16)
        self.upcast = nn.Linear(FEATURES, 2, dtype=torch.bfloat16)
        self.shared.weight = nn.Parameter(self.shared.weight.data, requires_grad=False)
        for name, param in list(self.upcast.named_parameters()):
            setattr(self.upcast, name, nn.Parameter(param.data.to(torch.float32)))


class ResizedLikeTransformers(nn.Module):
    """An embedding grown as transformers' `resize_token_embeddings` grows it: a new table made where the old one is
    (on meta, in the build), initialised, the old rows copied in, and its weights swapped into the old parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(FEATURES, 4)
        grown = nn.Embedding(FEATURES + 2, 4, device=self.embedding.weight.device)
        nn.init.normal_(grown.weight, std=0.02)
        grown.weight.data[:FEATURES, :] = self.embedding.weight.data[:FEATURES, :]
        self.embedding.weight.data = grown.weight.data


def build_under_auto_and_on_meta(build):
    """`build()` in host memory and under `parameters_on_meta`, from the same seed; the random states after each."""
    torch.manual_seed(0)
    auto = build()
    auto_state = torch.get_rng_state()
    torch.manual_seed(0)
    with parameters_on_meta():
        on_meta = build()
    return auto, auto_state, on_meta, torch.get_rng_state()


def assert_replays_as_built(on_meta: nn.Module, auto: nn.Module) -> None:
    for name, expected in auto.named_parameters():
        param = on_meta.get_parameter(name)
        assert param.is_meta and param.dtype == expected.dtype, name
        record = init_record(param)
        assert record is not None, name
        torch.manual_seed(1234)  # replaying draws from the record's states, not from the global generator
        value = torch.empty(expected.shape, dtype=expected.dtype)
        record.read_into(value)
        assert torch.equal(value, expected), name


@pytest.mark.parametrize("build", [DrawsInItsConstructor, InitialisedEveryWay,
                                   lambda: InitialisedEveryWay().to(torch.bfloat16), ReassignedAsNewParameters,
                                   lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(FEATURES, 2, 16), 2,
                                                                 enable_nested_tensor=False),
                                   lambda: nn.utils.parametrizations.weight_norm(nn.Linear(FEATURES, FEATURES)),
                                   lambda: nn.utils.parametrizations.spectral_norm(nn.Linear(FEATURES, FEATURES)),
                                   ResizedLikeTransformers],
                         ids=["drawn_in_the_constructor", "initialised_every_way", "cast_to_bf16",
                              "reassigned_as_new_parameters", "deep_copied_layers", "weight_norm", "spectral_norm",
                              "resized_like_transformers"])
def test_each_parameter_replays_the_weights_auto_builds_and_the_generator_ends_where_autos_does(build) -> None:
    auto, auto_state, on_meta, state = build_under_auto_and_on_meta(build)
    assert torch.equal(state, auto_state)
    assert_replays_as_built(on_meta, auto)
    for name, expected in auto.named_buffers():
        buffer = on_meta.get_buffer(name)
        if buffer.is_meta:  # computed from a parameter's weights
            value = torch.empty_like(expected)
            init_record(buffer).read_into(value)
            assert torch.equal(value, expected), name
        else:  # drawn at random: kept, as under auto
            assert torch.equal(buffer, expected), name


def test_a_replay_fails_on_a_changed_generator_state_and_a_missing_step() -> None:
    auto, _, on_meta, _ = build_under_auto_and_on_meta(InitialisedEveryWay)
    steps = init_record(on_meta.linear.weight).steps
    random_step = next(step for step in steps if step.random_state is not None)
    random_step.random_state = torch.Generator().manual_seed(1).get_state()
    with pytest.raises(AssertionError, match="linear.weight"):
        assert_replays_as_built(on_meta, auto)
    auto, _, on_meta, _ = build_under_auto_and_on_meta(InitialisedEveryWay)
    init_record(on_meta.linear.bias).steps.pop()  # the `add_(1.0)`
    with pytest.raises(AssertionError, match="linear.bias"):
        assert_replays_as_built(on_meta, auto)


class WithASparseBuffer(nn.Module):
    """A layout without a storage (sparse) beside the recorded weights."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(FEATURES, FEATURES)
        adjacency = torch.eye(FEATURES).to_sparse()
        adjacency.mul_(2.0)
        self.register_buffer("adjacency", adjacency)


def test_a_sparse_buffer_is_built_as_under_auto() -> None:
    auto, auto_state, on_meta, state = build_under_auto_and_on_meta(WithASparseBuffer)
    assert torch.equal(state, auto_state)
    assert_replays_as_built(on_meta, auto)
    assert torch.equal(on_meta.adjacency.to_dense(), auto.adjacency.to_dense())


class DrawnLikeAParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Parameter(torch.randn(FEATURES))
        self.second = nn.Parameter(torch.empty(FEATURES))
        with torch.no_grad():
            self.second.copy_(torch.randn_like(self.first))


def test_a_parameter_written_with_numbers_drawn_like_a_meta_one_is_left_to_its_initialiser() -> None:
    with parameters_on_meta():
        module = DrawnLikeAParameter()
    assert init_record(module.first) is not None
    assert init_record(module.second) is None


def test_without_a_record_no_number_drawn_from_the_global_generator_survives_the_build() -> None:
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with parameters_on_meta(record=False):
        module = DrawsInItsConstructor()
    assert torch.equal(torch.get_rng_state(), before)
    assert init_record(module.drawn) is None and init_record(module.filled) is None
    assert module.noise.is_meta  # drawn at random: left for its module's initialiser


def test_no_weight_stays_in_host_memory() -> None:
    features = 8192  # a 256 MiB weight
    rss = psutil.Process().memory_info().rss
    with parameters_on_meta():
        linear = nn.Linear(features, features, bias=False)
    assert linear.weight.is_meta
    # An eighth of the weight leaves room for the allocator's bookkeeping; a weight kept would count whole.
    assert psutil.Process().memory_info().rss - rss < linear.weight.nbytes // 8


def test_the_build_is_undone_when_it_raises() -> None:
    with pytest.raises(RuntimeError, match="in the constructor"), parameters_on_meta():
        raise RuntimeError("in the constructor")
    assert not nn.Linear(1, 1).weight.is_meta
    assert not torch.overrides._get_current_function_mode_stack()
