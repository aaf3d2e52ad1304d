"""Activation bytes measured on the meta device, against an independent count on a real forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_offload.models import CausalLM, TinyGPT
from lightning_offload.planner import measure_model, measure_module
from tests.conftest import TinyLM, token_batches

TINY = dict(vocab_size=256, d_model=128, n_layers=4, n_heads=4, max_seq_len=512)


def saved_bytes_of_a_real_forward(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    """The memory autograd holds for backward besides the parameters: every storage a tensor saved through
    `saved_tensors_hooks` points into, counted once (real tensors have addresses, meta ones do not)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens)
    return sum(storages.values())


def test_meta_measurement_matches_saved_tensor_bytes_of_a_real_forward_within_5_percent() -> None:
    with torch.device("meta"):
        on_meta = measure_model(TinyGPT(**TINY), torch.zeros(4, 512, dtype=torch.long, device="meta"))
    torch.manual_seed(0)
    real_model = TinyGPT(**TINY).to(torch.bfloat16)
    real = saved_bytes_of_a_real_forward(real_model, torch.randint(0, 256, (4, 512)))
    measured = on_meta.blocks * on_meta.activation_bytes_per_block + on_meta.outside_block_activation_bytes
    assert measured == pytest.approx(real, rel=0.05)
    assert on_meta.block_input_bytes == 4 * 512 * 128 * 2
    assert on_meta.logits == 4 * 512 * 256 and on_meta.tokens == 4 * 512
    assert on_meta.embedding_parameters == 256 * 128 + 512 * 128


class FloatRotaryGPT(TinyGPT):
    """Turns autocast off around part of its forward on the input's device type, as transformers 4.x's rotary
    embedding does."""

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            return super().forward(tokens, targets)


def test_a_forward_that_turns_autocast_off_on_its_device_type_measures_on_meta() -> None:
    tokens = torch.zeros(4, 512, dtype=torch.long, device="meta")
    with torch.device("meta"):
        expected = measure_model(TinyGPT(**TINY), tokens)
        assert measure_model(FloatRotaryGPT(**TINY), tokens) == expected
    assert torch.autocast is torch.amp.autocast


def _cpu_attention_saves_the_attention_matrix_under_grouped_query_attention() -> bool:
    """torch 2.8's CPU `scaled_dot_product_attention(enable_gqa=True)` takes the unfused path (later ones do not)."""
    query = torch.zeros(1, 4, 8, 2, requires_grad=True)
    key_value = torch.zeros(1, 2, 8, 2, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        F.scaled_dot_product_attention(query, key_value, key_value, is_causal=True, enable_gqa=True)
    return any(t.shape[-2:] == (8, 8) for t in saved)


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
    if _cpu_attention_saves_the_attention_matrix_under_grouped_query_attention():
        pytest.skip("this torch's CPU attention computes grouped-query attention unfused, saving the attention matrix "
                    "the fused kernel the measure counts does not")
    # q, k and v (gate and up) save one input: counted once, as a real forward holds it.
    torch.manual_seed(0)
    real = saved_bytes_of_a_real_forward(LlamaForCausalLM(config).to(torch.bfloat16), torch.randint(0, 1000, (2, 64)))
    assert stats.blocks * stats.activation_bytes_per_block + stats.outside_block_activation_bytes == \
        pytest.approx(real, rel=0.05)


@pytest.mark.parametrize("checkpointed_by", ["transformers", "recompute_in_backward"])
def test_blocks_that_checkpoint_themselves_are_measured_as_without_recompute_and_left_checkpointed(
        checkpointed_by: str) -> None:
    # Measured through the checkpoint a block saves only its input (or nothing, where transformers checkpoints
    # around the block's hooks, the input then counted outside the blocks too): the plan's `full` policy would
    # count every input twice and no recomputed block.
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_offload.activation_checkpointing import find_blocks, is_checkpointed, recompute_in_backward

    config = LlamaConfig(hidden_size=256, num_hidden_layers=3, intermediate_size=512, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=1000, attn_implementation="sdpa")
    tokens = torch.zeros(2, 64, dtype=torch.long, device="meta")
    with torch.device("meta"):
        plain, checkpointed = LlamaForCausalLM(config), LlamaForCausalLM(config)
    if checkpointed_by == "transformers":
        checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        for block in find_blocks(checkpointed):
            recompute_in_backward(block)
    checkpointed.train()
    assert measure_model(checkpointed, tokens) == measure_model(plain, tokens)
    assert all(is_checkpointed(block) for block in find_blocks(checkpointed))


def test_module_built_in_configure_model_is_measured_and_left_unbuilt() -> None:
    module = CausalLM(arch="gpt", network=dict(TINY))
    stats = measure_module(module, (torch.zeros(4, 512, dtype=torch.long),) * 2, dtype=torch.bfloat16,
                           step=lambda b: module.training_step(b, 0))
    assert module.net is None and not list(module.parameters())
    # CausalLM's output layer computes the loss in chunks: no full logits exist to count, one slice of them does.
    assert stats.blocks == 4 and stats.tokens == 4 * 512 and stats.logits == 0
    assert stats.loss_workspace_bytes == 2 * 4 * stats.tokens * 256  # fp32 logits of one slice (all the tokens) x 2


def test_module_with_weights_is_measured_in_place_without_touching_them() -> None:
    module = TinyLM()
    module.configure_model()
    before = {name: p for name, p in module.named_parameters()}
    snapshot = {name: p.detach().clone() for name, p in before.items()}
    inputs, targets = next(iter(token_batches(1)))
    # TinyLM's training_step calls `.item()`, which meta tensors cannot: the forward is measured instead.
    stats = measure_module(module, (inputs, targets), dtype=torch.float32, step=lambda b: module.training_step(b, 0))
    assert stats.blocks == 2 and stats.parameters == sum(p.numel() for p in before.values())
    after = dict(module.named_parameters())
    assert all(after[name] is before[name] for name in before)
    assert all(torch.equal(after[name], snapshot[name]) for name in before)
    assert module.net.head.weight is module.net.embed.weight
