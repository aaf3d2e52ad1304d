"""`activation_checkpointing="first_n"` on a CUDA device: the peak grows by one block's activations per block kept
whole, as the planner counts it, and the forward is the same computation as under `full` and `none`."""

from __future__ import annotations

import pytest
import torch

from lightning_offload.activation_checkpointing import CheckpointingConfig

pytestmark = pytest.mark.gpu

BLOCKS, BATCH, SEQ_LEN, VOCAB = 8, 8, 1024, 512
# Equal blocks save equal tensors: the growth per block kept whole agrees between two counts to this share, which
# covers tensors of the loss that may be live at one count's peak and not at another's.
LINEAR_RTOL = 0.02


def llama(config: CheckpointingConfig) -> torch.nn.Module:
    """8 blocks of ~150 MiB of saved activations each (8 x 1024 tokens); the weights are 25 MiB."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama_config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=BLOCKS,
                               num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ_LEN,
                               attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config).cuda()
    config.apply(model)
    return model


def loss_and_peak(config: CheckpointingConfig) -> tuple[float, int]:
    """The loss of one forward and the peak bytes its forward and backward add to the weights."""
    model = llama(config)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ_LEN), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch.cuda.synchronize()
    return loss.item(), torch.cuda.max_memory_allocated() - before


def test_each_block_kept_whole_adds_the_same_activations_to_the_peak() -> None:
    kept_whole = {kept: loss_and_peak(CheckpointingConfig(policy="first_n", first_n=BLOCKS - kept))
                  for kept in (2, 4, 6)}
    full, none = loss_and_peak(CheckpointingConfig(policy="full")), loss_and_peak(CheckpointingConfig(policy="none"))
    assert full[0] == none[0] and all(loss == full[0] for loss, _ in kept_whole.values())
    peaks = [full[1], *(peak for _, peak in kept_whole.values()), none[1]]
    assert peaks == sorted(peaks) and len(set(peaks)) == len(peaks)
    per_block = [(kept_whole[4][1] - kept_whole[2][1]) / 2, (kept_whole[6][1] - kept_whole[4][1]) / 2]
    assert per_block[1] == pytest.approx(per_block[0], rel=LINEAR_RTOL)
