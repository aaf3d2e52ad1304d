"""`activation_checkpointing="offload"` on a CUDA device: a tiny Llama trains as without it, with less GPU memory at its peak."""

from __future__ import annotations

import pytest
import torch

from lightning_offload.activation_checkpointing import CheckpointingConfig, activation_offloader

pytestmark = pytest.mark.gpu

STEPS, BATCH, SEQ_LEN, VOCAB = 3, 8, 1024, 512
# bf16 autocast: the copies are exact, but attention's backward may sum in another order between runs.
BF16_RTOL, GRAD_ATOL = 1.6e-2, 1e-4


def llama(policy: str) -> torch.nn.Module:
    """8 blocks of ~150 MiB of saved activations each (8 x 1024 tokens); the weights are 25 MiB."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ_LEN,
                         attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).cuda()
    CheckpointingConfig(policy=policy).apply(model)
    return model


def train(policy: str) -> tuple[list[float], list[torch.Tensor], int, list[int]]:
    """Losses and last gradients of `STEPS` SGD steps, the peak bytes a step adds to the weights, and the host
    buffers the offloader allocated by the end of each step."""
    model = llama(policy)
    offloader = activation_offloader(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator(device="cuda").manual_seed(1)
    losses, peak, allocations = [], 0, []
    for _ in range(STEPS):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ_LEN), device="cuda", generator=generator)
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.cuda.synchronize()
        peak = max(peak, torch.cuda.max_memory_allocated() - before)
        losses.append(loss.item())
        optimizer.step()
        allocations.append(offloader.pool.allocations if offloader and offloader.pool else 0)
    return losses, [p.grad.detach().clone() for p in model.parameters()], peak, allocations


def test_offload_trains_as_none_with_a_lower_peak() -> None:
    plain_losses, plain_grads, plain_peak, _ = train("none")
    losses, grads, peak, allocations = train("offload")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain_losses), rtol=BF16_RTOL, atol=0)
    for a, b in zip(grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=BF16_RTOL, atol=GRAD_ATOL)
    # Pinned buffers are allocated in the first step only.
    assert allocations[0] > 0 and allocations == [allocations[0]] * STEPS
    # 6 of 8 blocks' activations leave the GPU, at most 2 are there at once beside the one computing.
    assert peak < 0.6 * plain_peak, (peak / 2**20, plain_peak / 2**20)
