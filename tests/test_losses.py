"""The chunked output-layer cross-entropy against `F.cross_entropy` on the full fp32 logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_offload.losses import ChunkedLMHeadLoss, linear_cross_entropy, slice_workspace_bytes
from lightning_offload.models import CausalLM
from tests.conftest import peak_and_final_allocated_bytes

TOKENS, FEATURES, VOCAB = 24, 16, 50
# A chunk of fp32 logits holds 5 tokens of the vocabulary: the loop runs several slices, the last one shorter.
SMALL_CHUNK_BYTES = 4 * VOCAB * 5 + 4


def _inputs(dtype: torch.dtype = torch.float32, bias: bool = True, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, FEATURES, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(VOCAB, FEATURES, generator=generator) / 4).to(dtype).requires_grad_()
    bias_ = (torch.randn(VOCAB, generator=generator) / 4).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=generator)
    targets[::7] = -100
    return hidden, weight, bias_, targets


def _loss_and_grads(loss: torch.Tensor, *tensors: torch.Tensor | None) -> list[torch.Tensor]:
    present = [t for t in tensors if t is not None]
    return [loss.detach(), *torch.autograd.grad(loss, present)]


@pytest.mark.parametrize("bias", [True, False])
def test_fp32_loss_and_gradients_match_full_logits(bias: bool) -> None:
    hidden, weight, bias_, targets = _inputs(bias=bias)
    expected = _loss_and_grads(F.cross_entropy(F.linear(hidden, weight, bias_), targets), hidden, weight, bias_)
    chunked = linear_cross_entropy(hidden, weight, targets, bias_, chunk_bytes=SMALL_CHUNK_BYTES)
    # fp32 all the way: only the order of summation differs.
    for actual, reference in zip(_loss_and_grads(chunked, hidden, weight, bias_), expected):
        torch.testing.assert_close(actual, reference, rtol=1e-5, atol=1e-6)


def test_bf16_matches_the_bf16_head_with_fp32_loss() -> None:
    hidden, weight, _, targets = _inputs(torch.bfloat16, bias=False)
    logits = F.linear(hidden, weight).float()
    expected = _loss_and_grads(F.cross_entropy(logits, targets), hidden, weight)
    actual = _loss_and_grads(linear_cross_entropy(hidden, weight, targets, chunk_bytes=SMALL_CHUNK_BYTES),
                             hidden, weight)
    # Same bf16 matmuls; the hidden gradient is summed over vocabulary slices (one bf16 rounding each): 2 bf16 ulps.
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.float(), e.float(), rtol=2e-2, atol=2e-3)


def test_under_autocast_gradients_reach_fp32_weights() -> None:
    hidden, weight, _, targets = _inputs(bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = F.cross_entropy(F.linear(hidden, weight).float(), targets)
        loss = linear_cross_entropy(hidden, weight, targets, chunk_bytes=SMALL_CHUNK_BYTES)
    expected, actual = _loss_and_grads(reference, hidden, weight), _loss_and_grads(loss, hidden, weight)
    assert actual[2].dtype == torch.float32
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=2e-2, atol=2e-3)


def _saved_bytes(compute_loss) -> int:
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        compute_loss()
    return sum(saved.values())


def test_no_full_logits_are_kept_for_backward() -> None:
    tokens, features, vocab = 256, 32, 4096
    hidden = torch.randn(tokens, features, requires_grad=True)
    weight = torch.randn(vocab, features, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    full_logits = tokens * vocab * 4
    plain = _saved_bytes(lambda: F.cross_entropy(F.linear(hidden, weight).float(), targets))
    chunked = _saved_bytes(lambda: linear_cross_entropy(hidden, weight, targets))
    assert plain >= full_logits
    # hidden + weight (the head's own inputs) + per-token targets, mask and log-sum-exp.
    assert chunked <= hidden.nbytes + weight.nbytes + tokens * (8 + 1 + 4) + 64


def test_peak_allocation_is_the_gradients_kept_and_one_slice_s_workspace() -> None:
    # The planner counts `slice_workspace_bytes` for the loss: a slice's logits kept alive into the next slice
    # (3 slices' worth, not 2) would be memory it does not know of.
    tokens, features, vocab, rows = 1024, 64, 8000, 256
    hidden = torch.randn(tokens, features, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(vocab, features, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    chunk_bytes = 4 * vocab * rows
    graph: list[torch.Tensor] = []  # the loss, and with it what its graph keeps for backward
    peak, kept = peak_and_final_allocated_bytes(
        lambda: graph.append(linear_cross_entropy(hidden, weight, targets, chunk_bytes=chunk_bytes)))
    assert kept >= 2 * (hidden.numel() + weight.numel())  # the gradients of both, kept for backward
    workspace = slice_workspace_bytes(tokens, vocab, chunk_bytes)
    assert workspace == 2 * 4 * rows * vocab
    assert peak - kept == pytest.approx(workspace, rel=0.1)


@pytest.mark.gpu
def test_on_the_gpu_the_peak_is_the_gradients_kept_and_one_slice_s_workspace() -> None:
    # The planner's `loss_workspace_bytes` on CUDA, where logsumexp and the casts use their CUDA kernels: a 152K
    # vocabulary at the default 1 GiB slices, the 32.8B model's shapes.
    tokens, features, vocab = 8192, 5120, 152064
    device = torch.device("cuda")
    hidden = torch.randn(tokens, features, dtype=torch.bfloat16, device=device, requires_grad=True)
    weight = torch.randn(vocab, features, dtype=torch.bfloat16, device=device, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,), device=device)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = linear_cross_entropy(hidden, weight, targets)
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before
    peak = torch.cuda.max_memory_allocated() - before
    assert loss.isfinite()
    assert peak - kept == pytest.approx(slice_workspace_bytes(tokens, vocab), rel=0.1)


def test_gradients_are_computed_only_for_backward_and_backward_runs_once() -> None:
    hidden, weight, _, targets = _inputs(bias=False)
    with torch.no_grad():
        plain = F.cross_entropy(F.linear(hidden, weight), targets)
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets), plain)
    frozen_head = weight.detach()
    saved = _saved_bytes(lambda: linear_cross_entropy(hidden, frozen_head, targets))
    assert saved <= hidden.nbytes + 64  # the hidden states' gradient only: the frozen head gets none
    loss = linear_cross_entropy(hidden, weight, targets, chunk_bytes=SMALL_CHUNK_BYTES)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once per forward"):
        loss.backward()


def test_module_is_a_linear_without_targets_and_adopt_keeps_the_parameter() -> None:
    linear = nn.Linear(FEATURES, VOCAB)
    weight = linear.weight
    head = ChunkedLMHeadLoss.adopt(linear, chunk_bytes=SMALL_CHUNK_BYTES)
    assert head is linear and head.weight is weight and isinstance(head, nn.Linear)
    hidden, _, _, targets = _inputs()
    torch.testing.assert_close(head(hidden), F.linear(hidden, weight, linear.bias))
    torch.testing.assert_close(head(hidden[None], targets[None]), F.cross_entropy(head(hidden), targets))


@pytest.mark.parametrize("arch,network", [
    ("gpt", dict(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=8)),
    ("llama", dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8)),
])
def test_causal_lm_loss_matches_cross_entropy_of_its_logits(arch: str, network: dict) -> None:
    torch.manual_seed(0)
    model = CausalLM(arch=arch, network=network)
    model.configure_model()
    tokens = torch.randint(0, 64, (2, 9))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    expected = F.cross_entropy(model(inputs).flatten(0, 1).float(), targets.flatten())
    torch.testing.assert_close(model(inputs, targets), expected, rtol=1e-5, atol=1e-6)
    if arch == "gpt":
        assert model.net.head.weight is model.net.embed.weight
