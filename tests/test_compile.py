"""`compile_blocks=True`: every backend that allows it trains the same steps through compiled blocks."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from lightning_offload import SingleGPUOffloadStrategy
from lightning_offload.compile import compile_blocks, is_compiled
from tests.conftest import TinyLM, fit
from tests.test_strategy import FP32_RTOL, assert_losses_close

# Inductor fuses elementwise ops and may reorder their float arithmetic; in fp32 over 8 steps that stays far inside
# the tolerance the backends already meet against the plain run.
STRATEGIES = {
    "device": lambda **o: SingleGPUOffloadStrategy(backend="device", check_memory=False, **o),
    "fsdp": lambda **o: SingleGPUOffloadStrategy(backend="fsdp", check_memory=False, **o),
    "host_adam": lambda **o: SingleGPUOffloadStrategy(backend="host_adam", check_memory=False, bucket_numel=3000,
                                                      chunk_numel=700, **o),
    "stream": lambda **o: SingleGPUOffloadStrategy(backend="stream", check_memory=False, resident_blocks=0,
                                                   stream_outer=True, build_on_meta=False, **o),
}
PRECISION = {"device": "32-true", "fsdp": "32-true", "host_adam": "32-true", "stream": "bf16-true"}


def compiled_frames() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize(("backend", "checkpointing"), [("device", "full"), ("device", "offload"),
                                                        ("fsdp", "full"), ("host_adam", "none"), ("stream", "none")])
def test_compiled_blocks_train_the_same_steps(backend: str, checkpointing: str) -> None:
    make = STRATEGIES[backend]
    eager, _ = fit(make(activation_checkpointing=checkpointing), precision=PRECISION[backend])
    torch._dynamo.reset()
    before = compiled_frames()
    compiled, _ = fit(make(activation_checkpointing=checkpointing, compile_blocks=True), precision=PRECISION[backend])
    blocks = list(compiled.net.blocks)
    assert all(is_compiled(block) for block in blocks)
    # The graph is the blocks' own (one for both: parameters are inputs, not constants)...
    assert compiled_frames() > before
    # ...and the blocks ran through it to the same losses. bf16: the compiled kernels round other intermediates, which
    # stochastic rounding carries on (measured, 8 steps: 2.7% in torch 2.8, 0.25% in 2.13; doubled lr: 7.8%, 4.5%).
    rtol = 3.5e-2 if PRECISION[backend] == "bf16-true" else FP32_RTOL
    assert_losses_close(compiled.losses, eager.losses, rtol)
    assert compiled.losses[-1] < 0.95 * compiled.losses[0]


def test_every_block_shares_one_graph() -> None:
    module = TinyLM()
    module.configure_model()
    assert compile_blocks(module, ()) == 2
    torch._dynamo.reset()
    before = compiled_frames()
    module(torch.zeros(2, 8, dtype=torch.long)).sum().backward()
    assert compiled_frames() - before == 1


def test_deepspeed_is_refused_before_training() -> None:
    pytest.importorskip("deepspeed")
    strategy = SingleGPUOffloadStrategy(backend="deepspeed", check_memory=False, compile_blocks=True)
    with pytest.raises(ValueError, match="does not work with backend 'deepspeed'.*compile_blocks=False"):
        fit(strategy, num_batches=1)


def test_a_model_without_repeated_blocks_is_refused() -> None:
    with pytest.raises(ValueError, match="found no repeated block in Linear"):
        compile_blocks(torch.nn.Linear(2, 2))


def test_blocks_compile_in_this_process_unless_the_user_sized_the_worker_pool(monkeypatch) -> None:
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor, "compile_threads", 16)
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    module = TinyLM()
    module.configure_model()
    compile_blocks(module, ())
    assert inductor.compile_threads == 1
    monkeypatch.setattr(inductor, "compile_threads", 8)
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "8")
    other = TinyLM()
    other.configure_model()
    compile_blocks(other, ())
    assert inductor.compile_threads == 8
