"""The `host_adam` backend on a CPU "device": the same buckets, hooks and worker thread as on a GPU.

Tolerances: under `precision="32-true"` the device weights are fp32 and the host step is torch's fused AdamW on the
same fp32 gradients, so losses match the plain fp32 AdamW run to float rounding (fused vs foreach kernels; measured
1.2e-7): `EXACT_RTOL = 1e-5`. Under "bf16-mixed" the forward runs on bf16 weights (the fp32 master is exact, its
bf16 cast is not), so losses follow the plain bf16-mixed run within `BF16_RTOL` (3%, measured 0.4% over 16 steps).
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_offload import SingleGPUOffloadStrategy, consolidate
from lightning_offload.backends.host_adam.engine import Bucket, HostAdamEngine, layout
from lightning_offload.backends.host_adam import HostAdamBackend, HostAdamW
from tests.conftest import TinyLM, fit, token_batches
from tests.test_strategy import BF16_RTOL, assert_losses_close

EXACT_RTOL = 1e-5
# Small buckets and pieces, so parameters span buckets and buckets span parameters and param groups.
SMALL = dict(bucket_numel=3000, chunk_numel=700)


def host_adam(**options: Any) -> SingleGPUOffloadStrategy:
    # The planner's pre-flight check is tested on its own; here the backend runs on a CPU "device".
    return SingleGPUOffloadStrategy(backend="host_adam", check_memory=False, **{**SMALL, **options})


def test_layout_cuts_parameters_into_fixed_size_buckets() -> None:
    buckets = layout([5, 12, 3], bucket_numel=8)
    assert [(b.start, b.end) for b in buckets] == [(0, 8), (8, 16), (16, 20)]
    assert [[(s.param, s.offset, s.numel) for s in b.slices] for b in buckets] == [
        [(0, 0, 5), (1, 0, 3)], [(1, 3, 8)], [(1, 11, 1), (2, 0, 3)]]


def test_fp32_weights_match_plain_adamw() -> None:
    reference, _ = fit("auto")
    module, trainer = fit(host_adam())
    assert_losses_close(module.losses, reference.losses, EXACT_RTOL)
    assert module.losses[-1] < 0.95 * module.losses[0]
    assert all(p.grad is None for p in module.parameters()), "gradients are freed once on the host"


def test_activation_checkpointing_recomputes_inside_the_updating_backward() -> None:
    reference, _ = fit("auto", accumulate_grad_batches=2)
    module, _ = fit(host_adam(activation_checkpointing="full"), accumulate_grad_batches=2)
    assert_losses_close(module.losses, reference.losses, EXACT_RTOL)


def test_bf16_weights_track_plain_bf16_mixed_run() -> None:
    reference, _ = fit("auto", precision="bf16-mixed", max_epochs=2)
    module, _ = fit(host_adam(), precision="bf16-mixed", max_epochs=2)
    assert_losses_close(module.losses, reference.losses, BF16_RTOL)
    assert {p.dtype for p in module.parameters()} == {torch.bfloat16}


def test_cast_on_device_reaches_the_engine_and_the_cpu_path_ignores_it() -> None:
    # Sending fp32 back and casting there is a GPU choice; on a CPU the weights are cast in place as before.
    on_host, _ = fit(host_adam(cast_on_device=False), precision="bf16-mixed")
    cast, trainer = fit(host_adam(), precision="bf16-mixed")
    assert trainer.strategy.backend.config.cast_on_device  # the default
    assert not trainer.strategy.backend.engine.cast_on_device
    assert cast.losses == on_host.losses


def test_facade_is_an_optimizer_with_the_users_param_groups() -> None:
    module, trainer = fit(host_adam(), num_batches=2)
    optimizer = trainer.strategy.optimizers[0]
    assert isinstance(optimizer, torch.optim.Optimizer) and isinstance(optimizer, HostAdamW)
    groups = optimizer.param_groups
    assert [g["lr"] for g in groups] == [1e-2, 5e-3] and [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert sum(len(g["params"]) for g in groups) == len(list(module.parameters()))
    # Its state dict is torch's AdamW format: a plain AdamW resumes from it.
    plain = torch.optim.AdamW([{"params": list(g["params"])} for g in groups])
    plain.load_state_dict(optimizer.state_dict())
    assert all(int(s["step"]) == 2 for s in plain.state.values())


def test_host_updates_start_before_backward_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """The parameter finished last in backward (the tied embedding) waits, inside backward, for the worker to start
    updating the first bucket: if updates only began after backward, this would time out."""
    events: list[tuple[str, Any, float]] = []

    class Instrument(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            engine = trainer.strategy.backend.engine
            engine.timeline = timeline = []

            def wait_for_first_update(param: torch.Tensor) -> None:
                deadline = time.perf_counter() + 10
                while not any(what == "update" for what, *_ in timeline[len_before[0]:]):
                    assert time.perf_counter() < deadline, "no host update started while backward ran"
                    time.sleep(0.001)
                events.append(("embedding final", None, time.perf_counter()))

            len_before = [0]
            engine.params[-1].register_post_accumulate_grad_hook(wait_for_first_update)
            self.timeline, self.len_before = timeline, len_before

        def on_train_batch_start(self, *args: Any) -> None:
            self.len_before[0] = len(self.timeline)

    after_backward = HostAdamBackend.after_backward

    def timed_after_backward(self: HostAdamBackend) -> None:
        events.append(("backward ended", None, time.perf_counter()))
        after_backward(self)

    monkeypatch.setattr(HostAdamBackend, "after_backward", timed_after_backward)
    bucket_final = HostAdamEngine._bucket_final
    became_final: list[int] = []

    def recorded_bucket_final(self: HostAdamEngine, bucket: Bucket) -> None:
        became_final.append(bucket.index)
        bucket_final(self, bucket)

    monkeypatch.setattr(HostAdamEngine, "_bucket_final", recorded_bucket_final)
    instrument = Instrument()
    module, trainer = fit(host_adam(), num_batches=3, callbacks=[instrument])
    timeline = instrument.timeline
    engine = trainer.strategy.backend.engine
    per_step = len(engine.buckets)
    assert per_step > 5 and len(timeline) == 3 * 3 * per_step  # copy, update, done per bucket and step
    for step in range(3):
        updates = [(index, t) for what, index, t in timeline[step * 3 * per_step:(step + 1) * 3 * per_step]
                   if what == "update"]
        step_order = became_final[step * per_step:(step + 1) * per_step]
        # The layout follows backward: with torch's own operators (no library's replacement left behind by an
        # earlier run in the process) the buckets' gradients become final in layout order, the output layer's first.
        assert step_order == list(range(per_step)), "backward finished the buckets out of their layout's order"
        # The one worker steps each bucket once, in the order its gradients became final.
        assert [index for index, _ in updates] == step_order
        backward_end = [t for what, _, t in events if what == "backward ended"][step]
        assert updates[0][1] < backward_end


def test_accumulation_equals_the_larger_batch_run() -> None:
    accumulated, trainer = fit(host_adam(), num_batches=8, accumulate_grad_batches=2)
    assert trainer.global_step == 4
    large = TinyLM()
    batches = token_batches(8)
    pl.Trainer(strategy="auto", accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(
        large, DataLoader(batches.dataset, batch_size=2 * batches.batch_size, shuffle=False))
    pairs = torch.tensor(accumulated.losses).view(-1, 2).mean(1).tolist()
    assert_losses_close(pairs, large.losses, EXACT_RTOL)


def test_lr_scheduler_changes_apply_to_the_next_update() -> None:
    reference, _ = fit("auto", module=TinyLM(scheduler="step"))
    module, trainer = fit(host_adam(), module=TinyLM(scheduler="step"))
    assert_losses_close(module.losses, reference.losses, EXACT_RTOL)
    assert trainer.strategy.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-2 / 16)


@pytest.mark.parametrize(("algorithm", "value"), [("norm", 0.2), ("value", 0.002)])
def test_gradient_clipping_is_exact(algorithm: str, value: float) -> None:
    unclipped, _ = fit("auto")
    reference, _ = fit("auto", gradient_clip_val=value, gradient_clip_algorithm=algorithm)
    assert abs(reference.losses[-1] - unclipped.losses[-1]) > 1e-3, "the clipping threshold must bite"
    if algorithm == "norm":
        with pytest.warns(UserWarning, match="holds the updates until backward ends"):
            module, _ = fit(host_adam(), gradient_clip_val=value, gradient_clip_algorithm=algorithm)
    else:
        module, _ = fit(host_adam(), gradient_clip_val=value, gradient_clip_algorithm=algorithm)
    assert_losses_close(module.losses, reference.losses, EXACT_RTOL)


def test_resume_reproduces_the_uninterrupted_run_and_consolidates(tmp_path) -> None:
    uninterrupted, _ = fit(host_adam(), precision="bf16-mixed", module=TinyLM(scheduler="step"), max_epochs=2)
    first, trainer = fit(host_adam(), precision="bf16-mixed", module=TinyLM(scheduler="step"), max_epochs=1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    engine = trainer.strategy.backend.engine
    master = {name: engine.master_of(i).clone() for i, names in enumerate(
        [[n for n, p in first.named_parameters(remove_duplicate=False) if p is q] for q in engine.params])
        for name in names}
    resumed, resumed_trainer = fit(host_adam(), precision="bf16-mixed", module=TinyLM(scheduler="step"),
                                   max_epochs=2, ckpt_path=str(tmp_path / "epoch1.ckpt"))
    assert first.losses + resumed.losses == uninterrupted.losses
    assert resumed_trainer.global_step == 16

    state_dict = consolidate(tmp_path / "epoch1.ckpt", tmp_path / "plain.pt")
    plain = TinyLM()
    plain.configure_model()
    plain.load_state_dict(torch.load(tmp_path / "plain.pt"), strict=True)  # tied head.weight included
    assert {k: v.dtype for k, v in state_dict.items()} == {k: torch.float32 for k in plain.state_dict()}
    for name, value in master.items():
        torch.testing.assert_close(state_dict[name], value, rtol=0, atol=0)


def test_refuses_what_it_cannot_run_exactly() -> None:
    with pytest.raises(ValueError, match="backend='device'.*backend='deepspeed'"):
        fit(host_adam(), module=TinyLM(optimizer="sgd"), num_batches=1)
    with pytest.raises(ValueError, match="amsgrad"):
        fit(host_adam(), module=TinyLM(optimizer_kwargs={"amsgrad": True}), num_batches=1)
    with pytest.raises(ValueError, match="not supported by the `host_adam` backend"):
        fit(host_adam(), precision="16-true", num_batches=1)


def test_worker_failure_surfaces_in_the_training_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_offload.backends.host_adam.engine as engine_module

    def broken(*args: Any) -> None:
        raise RuntimeError("host step broke")

    monkeypatch.setattr(engine_module, "_adam_step", broken)
    with pytest.raises(RuntimeError, match="optimizer thread failed"):
        fit(host_adam(), num_batches=3)
    monkeypatch.undo()
    module, _ = fit(host_adam(), num_batches=2)  # the next fit in the process starts cleanly
    assert len(module.losses) == 2


def test_weight_averaging_reads_every_weight_updated(monkeypatch: pytest.MonkeyPatch) -> None:
    """`EMAWeightAveraging` reads every parameter after each step, outside the forward that would wait for them: the
    step returns once every bucket is updated. A slowed host update keeps buckets pending past a step that would not
    wait."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    update = HostAdamEngine._update

    def slow_update(self: HostAdamEngine, *args: Any) -> None:
        time.sleep(0.02)
        update(self, *args)

    monkeypatch.setattr(HostAdamEngine, "_update", slow_update)
    pending: list[int] = []

    class CountsPendingBuckets(EMAWeightAveraging):
        def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
            pending.append(sum(not b.host_done.is_set() for b in trainer.strategy.backend.engine.buckets))
            super().on_train_batch_end(trainer, module, *args)

    fit(host_adam(), num_batches=3, callbacks=[CountsPendingBuckets()])
    assert pending == [0, 0, 0]
