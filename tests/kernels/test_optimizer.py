"""`AdamW8bitFused` as a torch optimizer (CPU: the reference path)."""

from __future__ import annotations

import copy
import io
import statistics

import pytest
import torch

from lightning_offload.kernels import AdamW8bitFused


class SmallModel(torch.nn.Module):
    """bf16 layers plus an fp32 gain: two buckets (dtypes) inside one param group."""

    def __init__(self, dtype=torch.bfloat16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.hidden = torch.nn.Linear(16, 300).to(dtype)
        self.out = torch.nn.Linear(300, 1).to(dtype)
        self.gain = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.out(torch.nn.functional.gelu(self.hidden(x.to(self.hidden.weight.dtype)))).float() * self.gain


def train(model, optimizer, steps, scheduler=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        loss = model(torch.randn(32, 16, generator=generator)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        if step % 3 == 1:
            model.hidden.bias.grad = None  # a parameter that sits a step out
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def make_optimizer(model):
    weights, others = [model.hidden.weight, model.out.weight], [model.hidden.bias, model.out.bias, model.gain]
    return AdamW8bitFused([{"params": weights}, {"params": [], "lr": 1.0}, {"params": others, "weight_decay": 0.0}],
                          lr=1e-2, weight_decay=0.1, seed=7)


def test_state_dict_round_trip_reproduces_the_uninterrupted_run():
    model = SmallModel()
    optimizer = make_optimizer(model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    train(model, optimizer, 3, scheduler)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, buffer)
    train(model, optimizer, 4, scheduler, seed=1)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = SmallModel(seed=123)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = make_optimizer(resumed)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    resumed_scheduler = torch.optim.lr_scheduler.StepLR(resumed_optimizer, step_size=2, gamma=0.5)
    resumed_scheduler.load_state_dict(saved["scheduler"])
    train(resumed, resumed_optimizer, 4, resumed_scheduler, seed=1)

    for (name, want), got in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(want, got), name
    records = optimizer.state[model.hidden.weight]["state"]
    assert records.dtype == torch.uint8 and records.shape == (19, 528)  # 300 x 16 elements in 19 blocks
    assert resumed_optimizer.state_dict()["state"][0]["step"].item() == 7


def test_state_dict_of_another_optimizer_is_refused():
    model = SmallModel(dtype=torch.float32)
    adamw = torch.optim.AdamW(model.parameters())
    train(model, adamw, 1)
    optimizer = AdamW8bitFused(model.parameters())
    optimizer.load_state_dict(adamw.state_dict())
    with pytest.raises(ValueError, match="saved by `AdamW8bitFused`"):
        train(model, optimizer, 1)


def test_scheduler_and_param_groups_drive_the_update():
    model = SmallModel()
    optimizer = AdamW8bitFused(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.0)  # lr 0 from the first step
    before = copy.deepcopy(model.state_dict())
    train(model, optimizer, 2, scheduler)
    for want, got in zip(before.values(), model.state_dict().values()):
        assert torch.equal(want, got)
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.ones(5, dtype=torch.bfloat16))], "lr": 1.0})
    optimizer.param_groups[1]["params"][0].grad = torch.ones(5, dtype=torch.bfloat16)
    optimizer.step()
    assert optimizer.param_groups[1]["params"][0].float().max() < 1.0
    assert optimizer.state_dict()["state"][0]["step"].item() == 3  # carried over the re-bucketing


def _regression_losses(make_optimizer, dtype, steps=300):
    """A teacher MLP's targets fitted by a wider MLP, minibatch by minibatch; returns the loss curve."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    inputs = torch.randn(steps, 256, 32)
    with torch.no_grad():
        targets = teacher(inputs)
    torch.manual_seed(1)
    student = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.GELU(), torch.nn.Linear(256, 256),
                                  torch.nn.GELU(), torch.nn.Linear(256, 1)).to(dtype)
    optimizer = make_optimizer(student.parameters())
    losses = []
    for x, y in zip(inputs, targets):
        loss = torch.nn.functional.mse_loss(student(x.to(dtype)).float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_loss_tracks_fp32_adamw_at_least_as_closely_as_bitsandbytes():
    """bf16 weights, as the plans train them: 8-bit state + stochastic rounding vs fp32 AdamW and vs bnb's 8-bit."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the comparison")
    lr = 1e-3
    fp32 = _regression_losses(lambda p: torch.optim.AdamW(p, lr=lr), torch.float32)
    ours = _regression_losses(lambda p: AdamW8bitFused(p, lr=lr), torch.bfloat16)
    ours_fp32_weights = _regression_losses(lambda p: AdamW8bitFused(p, lr=lr), torch.float32)
    theirs = _regression_losses(lambda p: bnb.optim.AdamW8bit(p, lr=lr, min_8bit_size=0), torch.bfloat16)

    def final(losses):  # the minibatch loss is noisy: average the last 30 steps
        return statistics.mean(losses[-30:])

    def gap(losses):
        return abs(final(losses) - final(fp32)) / final(fp32)

    assert final(fp32) < 0.05 * fp32[0]  # it did train
    assert gap(ours) < 0.02 and gap(ours_fp32_weights) < 0.02
    assert gap(ours) <= gap(theirs)
