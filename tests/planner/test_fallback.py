"""Planning without a meta measurement: parameters as they are, activations bounded from the batch's shape, and a
checkpoint sized from its safetensors headers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lightning_offload.models import TinyGPT
from lightning_offload.planner import Machine, Plan, PlanDoesNotFit, estimate_memory, measure_model
from lightning_offload.planner.fallback import checkpoint_size, estimate_stats


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**dict(hidden_size=64, num_hidden_layers=3, intermediate_size=176, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=500, attn_implementation="sdpa"), **overrides})


def tiny_gpt() -> torch.nn.Module:
    return TinyGPT(vocab_size=256, d_model=64, n_layers=3, n_heads=4, max_seq_len=128)


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(tiny_llama_config())


def step_with_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    output = model(tokens)
    logits = getattr(output, "logits", output)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())


@pytest.mark.parametrize("build", [tiny_gpt, tiny_llama])
def test_the_estimate_bounds_what_a_transformer_saves_and_counts_its_parameters(build) -> None:
    tokens = torch.zeros(4, 128, dtype=torch.long)
    with torch.device("meta"):
        model = build()
        measured = measure_model(model, tokens.to("meta"), forward=step_with_loss)
    estimated = estimate_stats(model, tokens)
    assert (estimated.parameters, estimated.block_parameters, estimated.blocks) == \
        (measured.parameters, measured.block_parameters, measured.blocks)
    assert estimated.tokens == measured.tokens and estimated.width == measured.width
    for field in ("activation_bytes_per_block", "block_input_bytes", "outside_block_activation_bytes", "logits"):
        # An upper bound, and not a vacuous one: within 8x of what the meta forward measures.
        assert getattr(measured, field) <= getattr(estimated, field) <= 8 * getattr(measured, field), field


def test_no_batch_counts_no_activations() -> None:
    estimated = estimate_stats(tiny_gpt(), None)
    assert estimated.activation_bytes_per_block == estimated.logits == estimated.tokens == 0
    assert estimated.parameters == sum(p.numel() for p in tiny_gpt().parameters())


def test_a_checkpoint_is_counted_from_its_headers(tmp_path) -> None:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    size = checkpoint_size(tmp_path)
    assert size is not None and size.parameters == sum(p.numel() for p in model.parameters())
    assert size.bytes == 2 * size.parameters
    assert checkpoint_size(tmp_path / "elsewhere") is None


def test_frozen_parameters_are_counted_and_charged_weights_only() -> None:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_llama_config())
    for name, param in model.named_parameters():
        param.requires_grad_("lm_head" in name)  # a frozen trunk under a trained head
    stats = measure_model(model, torch.zeros(2, 32, dtype=torch.long, device="meta"))
    head = model.lm_head.weight.numel()
    assert stats.trainable_parameters == head and stats.trainable_block_parameters == 0
    assert dataclasses.replace(estimate_stats(model, None), tokens=0).frozen_parameters == stats.frozen_parameters
    assert stats.frozen_embedding_parameters == stats.embedding_parameters
    trained = dataclasses.replace(stats, frozen_parameters=0, frozen_block_parameters=0,
                                  frozen_embedding_parameters=0)
    for backend, optimizer in (("device", "adamw"), ("deepspeed", "cpu_adam"), ("fsdp", "adamw"),
                               ("stream", "adamw8bit_fused"), ("host_adam", "adamw")):
        frozen, whole = (estimate_memory(s, Plan(backend=backend, optimizer=optimizer, checkpointing="full"))
                         for s in (stats, trained))
        # The weights of every parameter; gradients and optimizer state of the head only.
        assert frozen.gpu_bytes + frozen.host_bytes < whole.gpu_bytes + whole.host_bytes, backend
        assert frozen.gpu.get("bf16 weights", 0) == whole.gpu.get("bf16 weights", 0)
    device = estimate_memory(stats, Plan(backend="device", optimizer="adamw"))
    assert device.gpu["fp32 gradients"] == 4 * head and device.gpu["optimizer state"] == 8 * head
    assert device.gpu["fp32 weights"] == 4 * stats.parameters
    host_adam = estimate_memory(stats, Plan(backend="host_adam", optimizer="adamw", resident_blocks=0))
    assert host_adam.host["fp32 master weights"] == 4 * head and host_adam.host["optimizer state"] == 8 * head
    # gpu_8bit's 8-bit AdamW allocates state for every parameter it holds.
    gpu_8bit = estimate_memory(stats, Plan(backend="gpu_8bit", optimizer="adamw8bit_fused"))
    assert gpu_8bit.gpu["optimizer state"] == estimate_memory(trained, gpu_8bit.plan).gpu["optimizer state"]


@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_host_memory_for_a_from_pretrained_build_is_checked_at_the_dtype_it_loads_in(tmp_path, monkeypatch,
                                                                                      dtype) -> None:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from lightning_offload.planner import GIB
    from lightning_offload.planner.fallback import UNMEASURED_MARGIN, build_first

    LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16).save_pretrained(tmp_path)
    size = checkpoint_size(tmp_path)
    # Room for the checkpoint's bf16 weights with the margin kept free, not for them in fp32.
    machine = Machine(gpu_memory_gib=80, host_memory_gib=3 * size.parameters / UNMEASURED_MARGIN / GIB)
    with pytest.raises(RuntimeError) as failure, torch.device("meta"):
        AutoModelForCausalLM.from_pretrained(tmp_path, **({"dtype": dtype} if dtype else {}))
    if dtype is None:
        pending = build_first(torch.nn.Module(), failure.value, machine)
        assert f"for the {size.parameters / 1e6:.2f}M parameters in {str(tmp_path)!r}, which fits" in pending.message
    else:
        with pytest.raises(PlanDoesNotFit, match="building it in host memory would need"):
            build_first(torch.nn.Module(), failure.value, machine)


def test_a_failure_with_no_checkpoint_behind_it_says_its_host_memory_is_not_checked() -> None:
    from lightning_offload.planner.fallback import build_first

    pending = build_first(torch.nn.Module(), RuntimeError("a custom init"), Machine.detect())
    assert "not checked before it is built" in pending.message


def test_a_sharded_checkpoint_is_counted_once_from_its_index(tmp_path) -> None:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    # A second format of the same weights beside the shards (as some repositories ship) is not counted.
    (tmp_path / "consolidated.safetensors").write_bytes(sorted(tmp_path.glob("model-*"))[0].read_bytes())
    assert checkpoint_size(tmp_path).parameters == sum(p.numel() for p in model.parameters())
