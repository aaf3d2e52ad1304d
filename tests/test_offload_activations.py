"""`activation_checkpointing="offload"` on the CPU: the same hooks as on a GPU, streams and events left out."""

from __future__ import annotations

import pytest
import torch

from lightning_offload import SingleGPUOffloadStrategy
from lightning_offload.activation_checkpointing import CheckpointingConfig, activation_offloader
from lightning_offload.activation_offload import HostPool
from lightning_offload.models import TinyGPT
from tests.conftest import SEQ_LEN, VOCAB, TinyLM, fit
from tests.test_activation_checkpointing import network, saved_bytes

# The tiny model's activations are a few KiB: every tensor is worth offloading here.
OFFLOAD = CheckpointingConfig(policy="offload", offload_min_bytes=0)


def offloaded_network() -> torch.nn.Module:
    model = network()
    OFFLOAD.apply(model)
    return model


def step(model: torch.nn.Module, tokens: torch.Tensor) -> None:
    model(tokens).square().mean().backward()


def test_gradients_are_bit_exact_over_steps_and_accumulation() -> None:
    plain, offloaded = network(), offloaded_network()
    for seed in range(3):  # 3 backward passes into the same .grad: accumulation, and buffers reused
        tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))
        step(plain, tokens)
        step(offloaded, tokens)
    for (name, a), (_, b) in zip(plain.named_parameters(), offloaded.named_parameters()):
        assert torch.equal(a.grad, b.grad), name
    assert activation_offloader(offloaded).offloaded_bytes > 0


def test_block_i_minus_1_comes_back_when_block_i_backward_starts() -> None:
    model = offloaded_network()
    offloader = activation_offloader(model)
    offloader.trace = []
    step(model, torch.randint(0, 64, (2, 16)))
    assert offloader.trace == [
        ("copy out", 0, ""), ("copy out", 1, ""), ("copy out", 2, ""),  # each as the next block starts
        ("backward", 3, ""), ("backward", 2, ""),  # the last two blocks are still on the device
        ("copy back", 1, "prefetch"), ("backward", 1, ""),
        ("copy back", 0, "prefetch"), ("backward", 0, ""),
    ]


def test_weights_stay_on_the_device_and_activations_leave_it() -> None:
    model = offloaded_network()
    offloader = activation_offloader(model)
    weights = {p.data_ptr() for p in model.parameters()}
    sent: dict[int, list[torch.Tensor]] = {}
    send_out = offloader._send_out

    def recording_send_out(group):
        sent[group.block_index] = [s.device_tensor for s in group.live()]
        send_out(group)

    offloader._send_out = recording_send_out
    step(model, torch.randint(0, 64, (2, 16)))
    assert sorted(sent) == [0, 1, 2] and all(sent.values())
    assert not {t.data_ptr() for tensors in sent.values() for t in tensors} & weights
    # Blocks 0 and 1 left the device; block 2's copy was not needed: its backward came before block 3's forward.
    assert offloader.offloaded_bytes == sum(t.numel() * t.element_size() for t in sent[0] + sent[1])


def test_saved_bytes_on_the_device_during_forward_fall_below_none() -> None:
    def deep() -> TinyGPT:
        torch.manual_seed(0)
        return TinyGPT(vocab_size=64, d_model=32, n_layers=8, n_heads=2, max_seq_len=16)

    none = saved_bytes(deep())
    model = deep()
    OFFLOAD.apply(model)
    outside_blocks = saved_bytes(model)  # the counting hooks see only what no block's hooks took
    offloader = activation_offloader(model)
    assert outside_blocks + offloader.packed_bytes == none
    # Six of the eight blocks left (0.55 of none stays: this tiny model's saved weights are most of it, and a
    # tensor saved twice leaves once); with none of them gone it would be 1.0, with two fewer 0.64.
    on_device = none - offloader.offloaded_bytes
    assert on_device < 0.6 * none, on_device / none


def test_host_buffers_are_reused_across_steps() -> None:
    model = offloaded_network()
    offloader = activation_offloader(model)
    step(model, torch.randint(0, 64, (2, 16)))
    allocations = offloader.pool.allocations
    for _ in range(3):
        step(model, torch.randint(0, 64, (2, 16)))
    assert allocations > 0 and offloader.pool.allocations == allocations
    assert offloader.pool.in_use_bytes == 0 and offloader.pool.free_bytes == offloader.pool.high_water_bytes


def test_a_dropped_graph_returns_its_buffers_and_keeps_no_groups() -> None:
    model = offloaded_network()
    offloader = activation_offloader(model)
    model(torch.randint(0, 64, (2, 16)))  # forward with grad, no backward: the graph is dropped
    model(torch.randint(0, 64, (2, 16)))
    assert offloader._pending.previous.previous.previous.previous is None  # this forward's 4 blocks only
    step(model, torch.randint(0, 64, (2, 16)))
    assert offloader.pool.in_use_bytes == 0


def test_the_pool_holds_no_more_than_its_peak_use() -> None:
    pool = HostPool(pin=False)
    first = [pool.take(1000) for _ in range(3)]
    for buffer in first:
        pool.give(buffer, None)
    second = [pool.take(1200) for _ in range(3)]  # another sequence length: new sizes evict the old ones
    assert pool.allocations == 6 and pool.free_bytes + pool.in_use_bytes <= pool.high_water_bytes == 3600
    assert pool.take(1000) is not None and pool.allocations == 7 and second


class FourBlockLM(TinyLM):
    """Four blocks: two leave the device in each forward (the last two are kept for backward)."""

    def configure_model(self) -> None:
        if self.net is None:
            with torch.random.fork_rng():
                torch.manual_seed(self.hparams.init_seed)
                self.net = TinyGPT(vocab_size=VOCAB, d_model=32, n_layers=4, n_heads=2, max_seq_len=SEQ_LEN)


@pytest.mark.parametrize("backend", ["device", "deepspeed"])
def test_trains_as_without_offload_with_accumulation_and_a_second_fit(backend: str) -> None:
    def train(policy: dict) -> tuple[TinyLM, SingleGPUOffloadStrategy]:
        module = FourBlockLM()
        strategy = SingleGPUOffloadStrategy(backend=backend, activation_checkpointing=policy)
        fit(strategy, module=module, num_batches=4, accumulate_grad_batches=2)
        fit(SingleGPUOffloadStrategy(backend=backend, activation_checkpointing=policy), module=module,
            num_batches=2)
        return module, strategy

    plain, _ = train({"policy": "none"})
    offloaded, _ = train({"policy": "offload", "offload_min_bytes": 0})
    assert len(offloaded.losses) == 6
    assert offloaded.losses == plain.losses  # bit-exact on the CPU
    offloader = activation_offloader(offloaded.net)
    assert offloader.offloaded_bytes > 0 and offloader.pool.in_use_bytes == 0
