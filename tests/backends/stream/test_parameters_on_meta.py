"""`parameters_on_meta`: the `stream` backend's build of `configure_model`, parameters on meta, buffers for real."""

from __future__ import annotations

import psutil
import pytest
import torch
from torch import nn

from lightning_offload.backends.stream.parameters_on_meta import parameters_on_meta
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


def test_no_number_drawn_from_the_global_generator_survives_the_build() -> None:
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with parameters_on_meta():
        module = DrawsInItsConstructor()
    assert torch.equal(torch.get_rng_state(), before)
    assert module.drawn.is_meta and module.filled.is_meta
    assert module.noise.is_meta  # drawn at random: left for its module's initialiser


def test_a_parameter_built_in_host_memory_is_never_written() -> None:
    features = 8192  # a 256 MiB weight
    rss = psutil.Process().memory_info().rss
    with parameters_on_meta():
        linear = nn.Linear(features, features, bias=False)
    assert linear.weight.is_meta
    # An eighth of the weight leaves room for the allocator's bookkeeping; a weight written to would count whole.
    assert psutil.Process().memory_info().rss - rss < linear.weight.nbytes // 8


def test_the_build_is_undone_when_it_raises() -> None:
    with pytest.raises(RuntimeError, match="in the constructor"), parameters_on_meta():
        raise RuntimeError("in the constructor")
    assert not nn.Linear(1, 1).weight.is_meta
    assert not torch.overrides._get_current_function_mode_stack()
