"""Model shapes: the analytic parameter counts behind model TFLOP/s and the limits, and checkpointing modes."""

from __future__ import annotations

import pytest
import torch

from bench.models import SIZES, build_llama, enable_checkpointing


def test_analytic_counts_match_a_built_model():
    model = build_llama("tiny", device="meta")
    assert sum(p.numel() for p in model.parameters()) == SIZES["tiny"].params
    assert model.get_input_embeddings().weight.numel() == SIZES["tiny"].input_embedding_params
    # Untied: the lm_head is a matrix of its own and does a matmul, so it counts in matmul_params.
    assert model.lm_head.weight is not model.get_input_embeddings().weight


@pytest.mark.parametrize("size", [name for name in SIZES if name != "tiny"])
def test_sizes_are_named_after_their_parameter_count(size):
    assert SIZES[size].params / 1e9 == pytest.approx(float(size.rstrip("b")), rel=0.02)


def test_built_in_the_asked_dtype_without_changing_the_default():
    model = build_llama("tiny", torch.bfloat16, "meta")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32
    assert model.training


@pytest.mark.parametrize("mode, reentrant", [("reentrant", True), ("non_reentrant", False)])
def test_checkpointing_is_explicit_about_reentrancy(mode, reentrant):
    model = build_llama("tiny", device="meta")
    enable_checkpointing(model, mode)
    layers = model.model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert layers[0]._gradient_checkpointing_func.keywords["use_reentrant"] is reentrant


def test_checkpointing_left_to_the_strategy_or_refused():
    model = build_llama("tiny", device="meta")
    enable_checkpointing(model, "by_strategy")
    assert not any(layer.gradient_checkpointing for layer in model.model.layers)
    with pytest.raises(ValueError, match="Unknown checkpointing mode"):
        enable_checkpointing(model, "selective")
