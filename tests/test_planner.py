"""The memory model on CPU: hand-checked terms, activation bytes measured on the meta device, refusals."""

from __future__ import annotations

import pytest
import torch

from lightning_offload.models import TinyGPT
from lightning_offload.planner import (
    GIB,
    Machine,
    ModelStats,
    Plan,
    PlanDoesNotFit,
    estimate_memory,
    measure_model,
    refusal,
    shortfalls,
)

TINY = dict(vocab_size=256, d_model=128, n_layers=4, n_heads=4, max_seq_len=512)
# Llama 8B at micro-batch 4 x 2048 (activation figures: order of magnitude of a bf16 decoder layer).
LLAMA_8B = ModelStats(parameters=8_030_261_248, block_parameters=218_112_000, blocks=32,
                      activation_bytes_per_block=1_400_000_000, block_input_bytes=67_108_864,
                      logits=4 * 2048 * 128256)


def test_optimizer_state_bytes_match_hand_calculation() -> None:
    params = LLAMA_8B.parameters
    adamw = estimate_memory(LLAMA_8B, Plan(backend="device", optimizer="adamw"))
    eight_bit = estimate_memory(LLAMA_8B, Plan(backend="device", optimizer="adamw8bit"))
    assert adamw.gpu["optimizer state"] == 8 * params
    # Two uint8 moments plus one fp32 absmax per 256-element block for each: 2 + 8/256 bytes/param.
    assert eight_bit.gpu["optimizer state"] == int(params * (2 + 8 / 256))
    assert adamw.gpu["fp32 weights"] == adamw.gpu["fp32 gradients"] == 4 * params


def test_deepspeed_offload_holds_18_bytes_per_parameter_in_pinned_host_memory() -> None:
    estimate = estimate_memory(LLAMA_8B, Plan(backend="deepspeed", optimizer="cpu_adam"))
    assert estimate.host_bytes == 18 * LLAMA_8B.parameters == estimate.pinned_bytes
    assert estimate.gpu_bytes < 0.25 * estimate_memory(LLAMA_8B, Plan(backend="device")).gpu_bytes


def test_meta_measurement_matches_a_real_forward_within_5_percent() -> None:
    with torch.device("meta"):
        on_meta = measure_model(TinyGPT(**TINY), torch.zeros(4, 512, dtype=torch.long, device="meta"))
    torch.manual_seed(0)
    real = measure_model(TinyGPT(**TINY), torch.randint(0, 256, (4, 512)))
    assert on_meta.activation_bytes_per_block == pytest.approx(real.activation_bytes_per_block, rel=0.05)
    assert (on_meta.parameters, on_meta.blocks, on_meta.block_input_bytes, on_meta.logits) == (
        real.parameters, real.blocks, real.block_input_bytes, real.logits)
    assert on_meta.block_input_bytes == 4 * 512 * 128 * 2


def test_llama_measures_on_meta_without_memory() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=256, num_hidden_layers=3, intermediate_size=512, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=1000, attn_implementation="sdpa")
    with torch.device("meta"):
        stats = measure_model(LlamaForCausalLM(config), torch.zeros(2, 64, dtype=torch.long, device="meta"))
    assert stats.blocks == 3 and stats.logits == 2 * 64 * 1000
    assert stats.block_input_bytes == 2 * 64 * 256 * 2
    # Larger than the block's input (q, k, v, MLP intermediates are saved), far below a saved attention matrix.
    assert 4 * stats.block_input_bytes < stats.activation_bytes_per_block < 40 * stats.block_input_bytes


def test_checkpointing_orders_estimated_activations() -> None:
    gpu = {policy: estimate_memory(LLAMA_8B, Plan(backend="device", checkpointing=policy)).gpu_bytes
           for policy in ("none", "every_k", "full")}
    assert gpu["full"] < gpu["every_k"] < gpu["none"]
    offload = estimate_memory(LLAMA_8B, Plan(backend="device", checkpointing="offload"))
    assert offload.host["saved activations"] == 32 * LLAMA_8B.activation_bytes_per_block


def test_planning_for_a_given_machine_is_deterministic() -> None:
    small = Machine(gpu_memory_gib=24, host_memory_gib=64)
    plan = Plan(backend="deepspeed", optimizer="cpu_adam")
    assert shortfalls(estimate_memory(LLAMA_8B, plan), small) == shortfalls(estimate_memory(LLAMA_8B, plan), small)
    assert set(shortfalls(estimate_memory(LLAMA_8B, plan), small)) == {"host RAM"}
    # As measured (ANCHORS.md): DeepSpeed's offload at 8B does not fit 125 GiB of RAM; a 1.5B model does.
    assert set(shortfalls(estimate_memory(LLAMA_8B, plan), Machine())) == {"host RAM"}
    smaller = ModelStats(**{**vars(LLAMA_8B), "parameters": 1_500_000_000, "block_parameters": 60_000_000})
    assert shortfalls(estimate_memory(smaller, plan), Machine()) == {}


def test_refusal_names_the_tier_and_the_shortfall() -> None:
    small = Machine(gpu_memory_gib=24, host_memory_gib=64)
    estimates = [estimate_memory(LLAMA_8B, Plan(backend=b, optimizer="cpu_adam" if b != "device" else "adamw8bit"))
                 for b in ("device", "deepspeed", "fsdp")]
    error = refusal(estimates, small)
    assert isinstance(error, PlanDoesNotFit)
    needed = min(estimates, key=lambda e: sum(shortfalls(e, small).values()))
    missing = shortfalls(needed, small)
    message = str(error)
    assert f"{next(iter(missing))} short by {next(iter(missing.values())):.1f} GiB" in message
    assert "24 GiB GPU, 64 GiB host RAM" in message and str(needed.plan) in message
    assert needed.host_bytes / GIB > 0
