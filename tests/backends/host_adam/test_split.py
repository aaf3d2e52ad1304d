"""`host_adam` with the front blocks' optimizer state on the "device" (here the CPU, through the same code path).

Tolerances, measured over 4 updates at lr 1e-2 (weights of magnitude 0.01-1): the device part runs torch's fused
AdamW on whole parameters, as `torch.optim.AdamW(fused=True)` does; the host path runs it on chunks of a bucket,
which moves an element between the kernel's vector body and scalar tail (1 ulp in one update), and clipping by norm
sums the norm in another order. Weights stay within 6e-8 of each other (`ATOL = 1e-6`), except the attention key
bias: softmax is invariant to it, so its gradient is rounding noise that Adam scales up to lr-sized steps, and an
ulp of difference there grows to 9e-6 (`KEY_BIAS_ATOL = 3e-5`).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lightning_offload import SingleGPUOffloadStrategy, consolidate
from lightning_offload.backends.host_adam.engine import HostAdamEngine
from lightning_offload.backends.host_adam import HostAdamBackend, HostAdamConfig
from tests.backends.host_adam.test_backend import SMALL
from tests.conftest import TinyLM, fit

ATOL = 1e-6
KEY_BIAS_ATOL = 3e-5
# TinyLM: the token and position embeddings, then 2 blocks of 12 parameters, then the final norm (the output layer
# is tied to the token embedding). Parameters whose state is on the device, by `gpu_state_blocks`:
ON_DEVICE = {0: 0, 1: 2 + 12, 2: 2 + 24}


def host_adam(**options: Any) -> SingleGPUOffloadStrategy:
    return SingleGPUOffloadStrategy(backend="host_adam", check_memory=False, **{**SMALL, **options})


def trained(strategy: Any, **trainer_kwargs: Any) -> tuple[dict[str, torch.Tensor], dict[int, Any], Any]:
    """Final fp32 weights and optimizer state of TinyLM after 8 micro-batches (two param groups with their own lr
    and weight decay, an LR schedule), accumulated in pairs: 4 updates. Copies: a later fit releases this one's."""
    module, trainer = fit(strategy, module=TinyLM(scheduler="step", optimizer_kwargs={"fused": True}),
                          accumulate_grad_batches=2, **trainer_kwargs)
    state = trainer.strategy.optimizers[0].state_dict()["state"]
    return ({name: p.detach().clone() for name, p in module.named_parameters()},
            {i: {k: v.clone() for k, v in s.items()} for i, s in state.items()}, trainer)


def assert_weights_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        atol = KEY_BIAS_ATOL if name.endswith("qkv.bias") else ATOL
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("clipping", [None, ("norm", 0.2), ("value", 0.002)], ids=["no_clip", "norm", "value"])
def test_front_state_on_the_device_gives_the_all_host_and_plain_adamw_weights(clipping: Any) -> None:
    clip = dict(gradient_clip_val=clipping[1], gradient_clip_algorithm=clipping[0]) if clipping else {}
    plain, _, _ = trained("auto", **clip)
    all_host, all_host_state, _ = trained(host_adam(gpu_state_blocks=0), **clip)
    assert_weights_close(all_host, plain)
    for blocks in (1, 2):
        split, state, trainer = trained(host_adam(gpu_state_blocks=blocks), **clip)
        engine = trainer.strategy.backend.engine
        assert len(engine.params) - engine.host_count == ON_DEVICE[blocks]
        assert_weights_close(split, all_host)
        assert_weights_close(split, plain)
        assert state.keys() == all_host_state.keys()
        for index, saved in all_host_state.items():
            assert int(state[index]["step"]) == int(saved["step"]) == 4
            torch.testing.assert_close(state[index]["exp_avg"], saved["exp_avg"], rtol=0, atol=ATOL)


def test_front_parameters_are_updated_inside_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    on_device, after_backward = HostAdamEngine._update_on_device, HostAdamBackend.after_backward

    def recorded_update(self: Any, index: int) -> None:
        events.append("device update")
        on_device(self, index)

    def recorded_after_backward(self: HostAdamBackend) -> None:
        events.append("backward ended")
        after_backward(self)

    monkeypatch.setattr(HostAdamEngine, "_update_on_device", recorded_update)
    monkeypatch.setattr(HostAdamBackend, "after_backward", recorded_after_backward)
    fit(host_adam(gpu_state_blocks=1), num_batches=2)
    step = ["device update"] * ON_DEVICE[1] + ["backward ended"]
    assert events == 2 * step


def test_optimizer_state_dict_round_trips_with_a_mixed_share() -> None:
    module, trainer = fit(host_adam(gpu_state_blocks=1), num_batches=3)
    optimizer = trainer.strategy.optimizers[0]
    saved = optimizer.state_dict()
    engine = trainer.strategy.backend.engine
    assert len(saved["state"]) == len(engine.params)  # the device part's state is in it too
    copied = {"state": {i: {k: v.clone() for k, v in s.items()} for i, s in saved["state"].items()},
              "param_groups": saved["param_groups"]}
    for index in range(len(engine.params)):
        for moment in engine.state_of(index):
            moment.zero_()
    optimizer.load_state_dict(copied)
    for index, entry in optimizer.state_dict()["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(entry[key], copied["state"][index][key], rtol=0, atol=0)
    plain = torch.optim.AdamW([{"params": list(g["params"])} for g in optimizer.param_groups])
    plain.load_state_dict(copied)
    assert all(int(s["step"]) == 3 for s in plain.state.values())


def test_resume_with_another_share_reproduces_the_uninterrupted_run(tmp_path) -> None:
    def run(blocks: int, epochs: int, ckpt_path: str | None = None) -> tuple[TinyLM, Any]:
        return fit(host_adam(gpu_state_blocks=blocks), precision="bf16-mixed", module=TinyLM(scheduler="step"),
                   max_epochs=epochs, ckpt_path=ckpt_path)

    uninterrupted, _ = run(1, 2)
    first, trainer = run(1, 1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    engine = trainer.strategy.backend.engine
    masters = {names[0]: engine.master_of(i).clone() for i, names in enumerate(
        [[n for n, p in first.named_parameters() if p is q] for q in engine.params])}
    resumed, _ = run(2, 2, str(tmp_path / "epoch1.ckpt"))
    assert first.losses + resumed.losses == uninterrupted.losses
    state_dict = consolidate(tmp_path / "epoch1.ckpt", tmp_path / "plain.pt")
    for name, value in masters.items():
        torch.testing.assert_close(state_dict[name], value, rtol=0, atol=0)


def test_a_share_the_model_cannot_have_is_refused_at_setup() -> None:
    with pytest.raises(ValueError, match="must be a block count from 0"):
        HostAdamConfig(gpu_state_blocks=-1)
    with pytest.raises(ValueError, match=r"`gpu_state_blocks=3` but TinyLM has 2 repeated blocks"):
        fit(host_adam(gpu_state_blocks=3), num_batches=1)


def test_the_planners_share_reaches_a_pinned_backend() -> None:
    # On a CPU "device" both tiers draw on one pool, so every block's state fits where the model computes.
    _, trainer = fit(SingleGPUOffloadStrategy(backend="host_adam", **SMALL), num_batches=1)
    assert trainer.strategy.plan_report.chosen.plan.resident_blocks == 2
    engine = trainer.strategy.backend.engine
    assert len(engine.params) - engine.host_count == ON_DEVICE[2]
