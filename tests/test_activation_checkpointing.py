"""Activation-checkpointing policies on CPU: block detection, and the bytes autograd keeps for backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_offload.activation_checkpointing import (
    CheckpointingConfig,
    activation_offloader,
    find_blocks,
    is_checkpointed,
    recompute_in_backward,
    remove_fit_checkpointing,
)
from lightning_offload.models import Block, TinyGPT


def network() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(vocab_size=64, d_model=32, n_layers=4, n_heads=2, max_seq_len=16)


def saved_bytes(model: torch.nn.Module) -> int:
    """Bytes of tensors autograd saves for backward during one forward (outside any checkpointed region)."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(torch.randint(0, 64, (4, 16))).sum().backward()
    return total


def test_detects_the_decoder_block_not_its_mlp() -> None:
    blocks = find_blocks(network())
    assert len(blocks) == 4 and all(isinstance(block, Block) for block in blocks)


def test_policies_order_saved_activation_bytes() -> None:
    saved = {}
    for name, config in {
        "none": CheckpointingConfig(policy="none"),
        "every_k": CheckpointingConfig(policy="every_k", every_k=2),
        "selective": CheckpointingConfig(policy="selective", module_classes=["Sequential"]),
        "full": CheckpointingConfig(policy="full"),
    }.items():
        model = network()
        config.apply(model)
        saved[name] = saved_bytes(model)
    assert saved["full"] < saved["every_k"] < saved["none"]
    assert saved["full"] < saved["selective"] < saved["none"]


def test_checkpointed_gradients_equal_plain_gradients() -> None:
    plain, checkpointed = network(), network()
    CheckpointingConfig(policy="full").apply(checkpointed)
    CheckpointingConfig(policy="full").apply(checkpointed)  # applying twice wraps once
    tokens = torch.randint(0, 64, (2, 16))
    for model in (plain, checkpointed):
        model(tokens).square().mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in checkpointed.named_parameters()]


def test_offload_leaves_tensors_under_its_threshold_on_the_device() -> None:
    plain, offloaded = network(), network()
    CheckpointingConfig(policy="offload").apply(offloaded)  # 1 MiB: this model's tensors are a few KiB
    tokens = torch.randint(0, 64, (2, 16))
    for model in (plain, offloaded):
        model(tokens).sum().backward()
    torch.testing.assert_close(plain.embed.weight.grad, offloaded.embed.weight.grad)
    offloader = activation_offloader(offloaded)
    assert offloader.packed_bytes > 0 and offloader.offloaded_bytes == 0 and offloader.pool is None


def test_first_n_checkpoints_exactly_the_first_n_blocks() -> None:
    model = network()
    blocks = find_blocks(model)
    assert CheckpointingConfig(policy="first_n", first_n=len(blocks) - 1).apply(model) == len(blocks) - 1
    assert [is_checkpointed(block) for block in blocks] == [True] * (len(blocks) - 1) + [False]
    reference = network()
    for block in find_blocks(reference)[:-1]:
        recompute_in_backward(block)
    assert saved_bytes(model) == saved_bytes(reference)
    with pytest.raises(ValueError, match=f"`first_n={len(blocks) + 1}` asks to checkpoint more blocks than TinyGPT "
                                         f"has \\({len(blocks)}\\)"):
        CheckpointingConfig(policy="first_n", first_n=len(blocks) + 1).apply(network())
    # A count left to the planner that no planner sized: every block, as `full`.
    assert CheckpointingConfig(policy="first_n").apply(network()) == len(blocks)
    with pytest.raises(ValueError, match="`first_n` \\(the number of blocks to checkpoint\\) must be at least 0"):
        CheckpointingConfig(policy="first_n", first_n=-1)


def test_checkpointing_some_blocks_trains_bit_for_bit_as_all_or_none() -> None:
    from lightning_offload import SingleGPUOffloadStrategy
    from tests.conftest import fit

    losses = {}
    for name, policy in {"none": "none", "full": "full", "first_n": {"policy": "first_n", "first_n": 1}}.items():
        module, trainer = fit(SingleGPUOffloadStrategy(backend="device", activation_checkpointing=policy),
                              num_batches=4)
        losses[name] = module.losses
        checkpointed = [is_checkpointed(block) for block in find_blocks(module)]
    assert checkpointed == [True] + [False] * (len(checkpointed) - 1)  # the last fit's, `first_n`
    assert len(losses["none"]) == 4 and losses["first_n"] == losses["none"] == losses["full"]


def test_bad_policy_values_are_refused() -> None:
    with pytest.raises(ValueError, match="Choose one of"):
        CheckpointingConfig(policy="fulll")
    with pytest.raises(ValueError, match="`offload_min_bytes` must be at least 0"):
        CheckpointingConfig(policy="offload", offload_min_bytes=-1)
    with pytest.raises(ValueError, match="needs `module_classes`"):
        CheckpointingConfig(policy="selective")
    with pytest.raises(ValueError, match="No module of class"):
        CheckpointingConfig(policy="selective", module_classes=["Nope"]).apply(network())


@pytest.mark.parametrize("policy", ["full", "every_k", "offload"])
def test_blocks_that_transformers_checkpoints_are_left_alone(policy: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64, use_cache=False)
    model = LlamaForCausalLM(config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # The layers recompute themselves already: a second checkpoint would recompute them twice, and offloading
    # inside transformers' checkpoint copies every activation out and back on top of the recompute.
    assert CheckpointingConfig(policy=policy).apply(model) == 0
    assert activation_offloader(model) is None
    tokens = torch.randint(0, 64, (2, 8))
    model(input_ids=tokens, labels=tokens).loss.backward()


def test_a_fits_wrappers_come_off_and_the_models_own_stay() -> None:
    model = network()
    blocks = find_blocks(model)
    recompute_in_backward(blocks[0])  # the model's own checkpointing
    plain_forward = type(blocks[1]).forward
    assert CheckpointingConfig(policy="offload", offload_min_bytes=0).apply(model) == len(blocks) - 1
    assert remove_fit_checkpointing(model) == len(blocks) - 1
    assert is_checkpointed(blocks[0]) and not any(is_checkpointed(block) for block in blocks[1:])
    assert activation_offloader(model) is None and blocks[1].forward.__func__ is plain_forward
    reference = network()
    recompute_in_backward(find_blocks(reference)[0])
    assert saved_bytes(model) == saved_bytes(reference)


def test_a_new_strategy_on_a_model_an_earlier_fit_wrapped_applies_its_own_policy(recwarn) -> None:
    from lightning_offload import SingleGPUOffloadStrategy
    from tests.conftest import TinyLM, fit

    module, _ = fit(SingleGPUOffloadStrategy(backend="device", activation_checkpointing="offload"), num_batches=2,
                    module=TinyLM())
    assert activation_offloader(module) is not None
    _, trainer = fit(SingleGPUOffloadStrategy(backend="device", activation_checkpointing="none"), num_batches=2,
                     module=module)
    assert not any(is_checkpointed(block) for block in find_blocks(module)) and activation_offloader(module) is None
    assert not [w for w in recwarn if "does not apply" in str(w.message)]
    assert {c.plan.checkpointing for c in trainer.strategy.plan_report.candidates} == {"none"}


def test_former_module_name_warns_and_is_the_same_module() -> None:
    import importlib
    import sys

    import lightning_offload.activation_checkpointing as current

    sys.modules.pop("lightning_offload.checkpointing", None)
    with pytest.warns(DeprecationWarning, match="lightning_offload.activation_checkpointing"):
        former = importlib.import_module("lightning_offload.checkpointing")
    assert former is current


def test_a_recomputed_block_creates_its_tensors_in_the_forwards_default_dtype() -> None:
    """Lightning's `bf16-true` (and DeepSpeed's precision) set the default dtype for the forward only; backward, where
    the block is recomputed, runs outside it. A block that makes a tensor (a mask, a rotary table) must get it in
    the forward's dtype again, or its recompute fails or saves other tensors than its forward did."""

    class MakesATensor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4, dtype=torch.bfloat16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x) @ torch.ones(4, 4)

    block = MakesATensor()
    recompute_in_backward(block)
    x = torch.randn(2, 4, dtype=torch.bfloat16, requires_grad=True)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        out = block(x)
    finally:
        torch.set_default_dtype(previous)
    out.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16


def test_a_block_that_writes_a_cache_is_recomputed_without_it() -> None:
    """T5's decoder blocks fill a key/value cache in forward; recomputed with it, they would find it filled and save
    other tensors (torch's checkpoint raises). Checkpointed every block, T5 trains as without checkpointing."""
    from lightning_offload import SingleGPUOffloadStrategy
    from tests.conformance.runs import run

    checkpointed = run("t5", SingleGPUOffloadStrategy(backend="device", activation_checkpointing="full"))
    plain = run("t5", SingleGPUOffloadStrategy(backend="device", activation_checkpointing="none"))
    assert checkpointed.refusal is None and len(plain.losses) > 0
    # The plain run's decoder blocks write their cache and the recomputed ones run without it, as under transformers'
    # own gradient checkpointing: with transformers 5.25 their gradients differ in the last bits (the losses by
    # 1.0e-7 relative at most over the 8 steps).
    torch.testing.assert_close(torch.tensor(checkpointed.losses), torch.tensor(plain.losses), rtol=1e-6, atol=0.0)
