"""The streaming plan on CPU, with the CPU standing in for the device: placement, schedule, numerics, resume."""

from __future__ import annotations

import shutil
from collections import defaultdict, namedtuple

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_offload
from lightning_offload import SingleGPUOffloadStrategy
from lightning_offload.backends.stream.lanes import Lanes
from lightning_offload.backends.stream.placement import (
    GIB,
    UnitSize,
    check_host_memory,
    place_units,
    spread,
)
from tests.conftest import TinyLM, fit

# Streams every unit that can stream: position embedding, both blocks and the final norm (the tied embedding and
# output layer form one unit of two modules, which stays resident).
ALL_STREAMED = dict(resident_blocks=0, stream_outer=True, build_on_meta=False)


def stream(**options) -> SingleGPUOffloadStrategy:
    # The planner does not model the CPU standing in for the device: its check is for GPUs.
    return SingleGPUOffloadStrategy(backend="stream", check_memory=False, **{**ALL_STREAMED, **options})


def backend_of(trainer):
    return trainer.strategy.backend


# ---------------------------------------------------------------------------------------------- placement
def blocks_and_outer(blocks: int = 8, block_bytes: int = GIB, outer_bytes: int = GIB) -> list[UnitSize]:
    return [UnitSize(outer_bytes, outer_bytes, False), *(UnitSize(block_bytes, block_bytes, True)
                                                          for _ in range(blocks)), UnitSize(outer_bytes, outer_bytes,
                                                                                            False)]


def test_spread_places_streamed_blocks_between_resident_ones() -> None:
    assert spread(2, 8) == [2, 6]
    assert spread(4, 8) == [1, 3, 5, 7]
    assert spread(8, 8) == list(range(8))
    assert spread(0, 8) == []


def test_placement_keeps_as_many_blocks_resident_as_fit() -> None:
    units = blocks_and_outer()
    everything = place_units(units, gpu_free_bytes=100 * GIB)
    assert everything.streamed == frozenset()
    # 2 outer + 8 blocks resident would need 10 GiB + 3 state slots + 2 units of gradients = 15 GiB.
    assert everything.gpu_bytes == 15 * GIB
    tight = place_units(units, gpu_free_bytes=15 * GIB)
    assert tight.streamed == frozenset()
    squeezed = place_units(units, gpu_free_bytes=14 * GIB)
    # One streamed block frees 1 GiB of resident weights but adds 3 GiB of weight slots: 2 more must go.
    assert squeezed.resident_blocks(units) == 4
    assert squeezed.gpu_bytes <= 14 * GIB
    assert squeezed.host_pinned_bytes == 10 * GIB + 4 * GIB  # state of every unit + streamed weights


def test_placement_refuses_with_the_shortfall_and_counts_accumulated_gradients() -> None:
    units = blocks_and_outer()
    with pytest.raises(MemoryError, match=r"GiB more than the 2.0 GiB left after activations"):
        place_units(units, gpu_free_bytes=2 * GIB)
    single = place_units(units, gpu_free_bytes=100 * GIB, accumulate=1)
    accumulating = place_units(units, gpu_free_bytes=100 * GIB, accumulate=4)
    assert accumulating.gpu_bytes - single.gpu_bytes == 8 * GIB  # all 10 GiB of gradients instead of 2 units'
    assert accumulating.host_gradient_bytes == 0  # nothing streamed: every gradient stays on the GPU


def test_accumulating_sums_the_streamed_units_gradients_in_host_memory() -> None:
    units = blocks_and_outer()
    # Every unit streamed: 3 weight slots + 3 state slots + 2 units' gradients in flight + 3 gradient slots.
    placement = place_units(units, gpu_free_bytes=11 * GIB, accumulate=4)
    assert len(placement.streamed) == 10 and placement.gpu_bytes == 11 * GIB
    assert placement.host_gradient_bytes == 10 * GIB
    assert placement.host_pinned_bytes == 10 * GIB + 10 * GIB + 10 * GIB  # state, weights, gradient sums
    # The 8 blocks streamed, the 2 outer units resident with their gradients: 2 weights + 3 + 3 slots + 2 kept
    # gradients + 2 in flight + 3 gradient slots.
    roomier = place_units(units, gpu_free_bytes=15 * GIB, accumulate=4)
    assert len(roomier.streamed) == 8 and roomier.gpu_bytes == 15 * GIB
    with pytest.raises(MemoryError, match=r"1.00 GiB per gradient slot\), 1.0 GiB more than the 10.0 GiB"):
        place_units(units, gpu_free_bytes=10 * GIB, accumulate=4)


def test_host_check_names_the_shortfall() -> None:
    placement = place_units(blocks_and_outer(), gpu_free_bytes=100 * GIB)
    with pytest.raises(MemoryError, match=r"10.0 GiB of pinned host memory .* 8.0 GiB more than the 6.0 GiB"):
        check_host_memory(placement, available_bytes=6 * GIB, reserve_bytes=4 * GIB)
    check_host_memory(placement, available_bytes=14 * GIB, reserve_bytes=4 * GIB)


# ---------------------------------------------------------------------------------------------- numerics
def test_losses_track_fp32_adamw() -> None:
    reference, _ = fit("auto")
    # Built before the Trainer, in fp32: the same weights as the reference's, rounded once to bf16 (torch 2.8 draws
    # other numbers into a model built in bf16).
    module = TinyLM()
    module.configure_model()
    streamed, trainer = fit(stream(), precision="bf16-true", module=module)
    assert len(backend_of(trainer).placement.streamed) == 4
    # bf16 weights with stochastic rounding and 8-bit state, against fp32 weights and state: 8 steps stay within
    # 0.02 of the reference loss (measured: 0.011).
    assert max(abs(a - b) for a, b in zip(streamed.losses, reference.losses)) < 0.02


def test_updates_are_those_of_adamw8bit_fused_stepped_after_backward() -> None:
    # The same 8-bit AdamW and rounding bits: streaming changes where and when each unit is updated, never the
    # numbers. Two param groups (own lr and weight decay), non-default betas and eps, a per-step LR schedule and a
    # tied embedding all carry over, bit for bit.
    def module() -> TinyLM:
        return TinyLM(scheduler="step", optimizer_kwargs=dict(betas=(0.8, 0.95), eps=1e-6))

    fused, _ = fit(SingleGPUOffloadStrategy(backend="device", optimizer="adamw8bit_fused", check_memory=False),
                   precision="bf16-true", module=module())
    streamed, trainer = fit(stream(), precision="bf16-true", module=module())
    assert len(backend_of(trainer).placement.streamed) == 4
    assert streamed.losses == fused.losses
    for (name, expected), actual in zip(fused.net.named_parameters(), streamed.net.parameters()):
        assert torch.equal(actual, expected), name


def rounding_inputs(trainer) -> dict[str, tuple[int, int]]:
    """(rounding key, steps taken) of every trained parameter by name: with the seed, all its stochastic-rounding
    bits depend on, so both must not depend on where the parameter lives."""
    units = backend_of(trainer).units
    names = {id(p): n[0] for unit in units for p, n in zip(unit.params, unit.names)}
    return {names[id(p)]: (entry.bucket.keys[i], entry.bucket.steps[i])
            for unit in units for entry in unit.buckets for i, p in enumerate(entry.params)}


def test_streamed_and_resident_placements_compute_the_same_steps() -> None:
    resident, resident_trainer = fit(stream(resident_blocks=2, stream_outer=False), precision="bf16-true")
    streamed, trainer = fit(stream(), precision="bf16-true")
    assert streamed.losses == resident.losses
    keys = rounding_inputs(trainer)
    assert keys == rounding_inputs(resident_trainer)
    assert len({key for key, _ in keys.values()}) == len(keys) and {steps for _, steps in keys.values()} == {8}
    backend = backend_of(trainer)
    for unit in backend.units:  # streamed weights live in the host arena between steps
        arena = backend._arenas[0].buffer
        inside = arena.data_ptr() <= unit.params[0].data_ptr() < arena.data_ptr() + arena.numel()
        assert inside == unit.streamed


def test_lr_scheduler_drives_the_update() -> None:
    _, trainer = fit(stream(), precision="bf16-true", module=TinyLM(scheduler="step"), num_batches=4)
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)  # StepLR(step_size=2, gamma=0.5), 4 steps


class GradientsBetweenMicroBatches(pl.Callback):
    """Which parameters hold a gradient after each micro-batch that does not step."""

    def __init__(self, accumulate: int) -> None:
        self.accumulate, self.seen = accumulate, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % self.accumulate:
            self.seen.append({name for name, p in module.named_parameters() if p.grad is not None})


@pytest.mark.parametrize(("accumulate", "num_batches"), [(2, 8), (3, 9)])
def test_accumulation_sums_streamed_gradients_in_host_memory_as_autograd_sums_them(accumulate, num_batches) -> None:
    # All resident: autograd sums every gradient on the device. All streamed: each micro-batch's gradients go to
    # host memory (copied the first time, added after) and the last one's are added to their sum before the update.
    resident, _ = fit(stream(resident_blocks=2, stream_outer=False), precision="bf16-true",
                      accumulate_grad_batches=accumulate, num_batches=num_batches)
    watch = GradientsBetweenMicroBatches(accumulate)
    streamed, trainer = fit(stream(), precision="bf16-true", accumulate_grad_batches=accumulate,
                            num_batches=num_batches, callbacks=[watch])
    assert streamed.losses == resident.losses
    backend = backend_of(trainer)
    steps = {s for unit in backend.units for entry in unit.buckets for s in entry.bucket.steps}
    assert steps == {num_batches // accumulate}
    streamed_names = {name for i in backend.placement.streamed for names in backend.units[i].names for name in names}
    # Only the unit that stays resident (the tied embedding and output layer) keeps its gradients on the device.
    assert watch.seen and all(held and not held & streamed_names for held in watch.seen)
    loaded = {label for action, _, label in backend.lanes.log if action == "copy" and label.startswith("load grad")}
    assert loaded == {f"load gradients {i}" for i in backend.placement.streamed}
    assert "the streamed units' gradients summed in pinned host memory between micro-batches" in backend.describe()


# ---------------------------------------------------------------------------------------------- schedule
def test_schedule_orders_copies_and_events() -> None:
    _, trainer = fit(stream(timing=True), precision="bf16-true", num_batches=2)
    backend = backend_of(trainer)
    log = backend.lanes.log  # the last step's backward (cleared when it began), and nothing after it
    streamed = sorted(backend.placement.streamed)
    updates = [int(label) for action, _, label in log if action == "update"]
    assert updates == sorted(updates, reverse=True)  # units update in backward order
    assert set(updates) == {u.index for u in backend.units}
    for index in updates:
        def position(entry):
            return log.index(entry)
        update = position(("update", "compute", str(index)))
        assert position(("wait", "compute", f"loaded state {index}")) < update or \
            ("copy", "h2d", f"load state {index}") not in log  # a state still in its slot needs no wait
        assert position(("wait", "d2h", f"updated {index}")) < position(("copy", "d2h", f"save state {index}"))
        saved = position(("record", "d2h", f"saved {index}"))
        assert position(("copy", "d2h", f"save state {index}")) < saved
        if index in streamed:
            assert position(("copy", "d2h", f"save weights {index}")) < saved
    # The last 3 streamed units of the forward are still in the 3 weight slots when backward starts: only the
    # others are loaded again for their recompute, in backward order.
    loads = [int(label.split()[-1]) for action, lane, label in log if action == "copy" and
             label.startswith("load weights")]
    assert loads == sorted(loads, reverse=True) and set(loads) == set(streamed[:-3]) and loads


def test_ring_slots_are_reused_and_loads_wait_for_their_slot() -> None:
    _, trainer = fit(stream(weight_slots=2, state_slots=2), precision="bf16-true", num_batches=2)
    backend = backend_of(trainer)
    log = backend.lanes.log
    slots = backend.scheduler.weights.slots
    assert len(slots) == 2 and len({s.buffer.data_ptr() for s in slots}) == 2
    # With 2 state slots and 5 units, state loads must wait for a slot freed by an earlier unit's save.
    state_loads = [i for i, entry in enumerate(log) if entry[0] == "copy" and entry[2].startswith("load state")]
    assert len(state_loads) == len(backend.units)
    waited = [log[i - 1] for i in state_loads[2:]]
    assert all(entry[:2] == ("wait", "h2d") and entry[2].startswith("saved") for entry in waited)


def unordered_uses(log: list[tuple[str, str, str]]) -> list[str]:
    """Pairs of uses of one buffer on different lanes, one of them a write, that no event orders: races on a GPU.

    Replays the log with a vector clock per lane: a lane's own uses are in order; a wait makes the waiting lane
    see everything the recording lane had done when it recorded. A wait names the event by its label and takes the
    latest record of it, which can only make more uses look ordered than are, never fewer.
    """
    clocks: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    recorded: dict[str, dict[str, int]] = {}
    uses: dict[str, list[tuple[str, int, str, int]]] = defaultdict(list)
    races = []
    for position, (action, lane, label) in enumerate(log):
        clock = clocks[lane]
        if action == "record":
            recorded[label] = dict(clock)
        elif action == "wait":
            for other, tick in recorded[label].items():
                clock[other] = max(clock[other], tick)
        elif action in ("read", "write"):
            clock[lane] += 1
            for other, tick, kind, where in uses[label]:
                if other != lane and "write" in (kind, action) and clock[other] < tick:
                    races.append(f"{label}: {kind} on {other} (entry {where}) vs {action} on {lane} (entry {position})")
            uses[label].append((lane, clock[lane], action, position))
    return races


def test_race_check_flags_a_missing_wait() -> None:
    ordered = [("write", "h2d", "slot"), ("record", "h2d", "loaded"), ("wait", "compute", "loaded"),
               ("read", "compute", "slot"), ("record", "compute", "used"), ("wait", "h2d", "used"),
               ("write", "h2d", "slot")]
    assert unordered_uses(ordered) == []
    assert len(unordered_uses([e for e in ordered if e != ("wait", "h2d", "used")])) == 1
    assert len(unordered_uses([e for e in ordered if e != ("wait", "compute", "loaded")])) == 1
    assert unordered_uses([("read", "d2h", "slot"), ("read", "compute", "slot")]) == []  # two reads never race


@pytest.mark.parametrize(("slots", "accumulate"), [((2, 2), 1), ((4, 5), 1), ((2, 2), 2), ((2, 2), 3)],
                         ids=["rings-smaller-than-model", "every-unit-cached", "accumulating", "accumulating-three"])
def test_every_conflicting_use_of_a_slot_or_host_buffer_is_ordered_by_an_event(monkeypatch, slots, accumulate) -> None:
    # Keep the whole run's log: a slot's last use in one step and its refill in the next must be ordered too.
    monkeypatch.setattr(Lanes, "start_step", lambda self: None)
    weight_slots, state_slots = slots
    _, trainer = fit(stream(weight_slots=weight_slots, state_slots=state_slots), precision="bf16-true",
                     num_batches=3 * accumulate, accumulate_grad_batches=accumulate)
    log = backend_of(trainer).lanes.log
    assert sum(1 for action, lane, _ in log if action == "write" and lane == "h2d") > 0
    assert unordered_uses(log) == []


def test_stepping_outside_a_known_backward_is_refused() -> None:
    module, trainer = fit(stream(), precision="bf16-true", num_batches=1)
    inputs = torch.randint(0, 64, (2, 16))
    with pytest.raises(RuntimeError, match="manual_backward"):
        module(inputs).float().sum().backward()


# ---------------------------------------------------------------------------------------------- refusals
def test_gradient_clipping_is_refused_at_setup() -> None:
    with pytest.raises(ValueError, match="gradient_clip_val"):
        fit(stream(), precision="bf16-true", gradient_clip_val=1.0)


def test_other_optimizers_are_refused() -> None:
    with pytest.raises(ValueError, match="returned `SGD`"):
        fit(stream(), precision="bf16-true", module=TinyLM(optimizer="sgd"))


def test_fp16_is_refused() -> None:
    with pytest.raises(ValueError, match="bf16-mixed"):
        fit(stream(), precision="16-true")


def test_model_checkpoint_larger_than_the_disk_is_refused(tmp_path, monkeypatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(OSError, match=r"needs 0.0 GiB .* has 0.0 GiB free"):
        fit(stream(), precision="bf16-true", enable_checkpointing=True,
            callbacks=[ModelCheckpoint(dirpath=tmp_path, save_top_k=1)])


# ---------------------------------------------------------------------------------------------- building
@pytest.mark.parametrize("initial_weights", ["as_auto", "on_device"])
def test_meta_build_initialises_every_unit(initial_weights) -> None:
    module, trainer = fit(stream(build_on_meta=True, initial_weights=initial_weights), precision="bf16-true",
                          num_batches=4)
    assert all(not p.is_meta for p in module.parameters())
    assert module.net.head.weight is module.net.embed.weight  # the tie survives materialisation
    assert all(torch.isfinite(torch.tensor(module.losses)))
    norm = module.net.norm.weight.float()
    assert (norm - 1).abs().max() < 0.1  # LayerNorm's reset_parameters ran (then 4 small steps)


def test_an_unknown_initial_weights_choice_is_refused() -> None:
    with pytest.raises(ValueError, match="`initial_weights='cpu'`: choose one of as_auto, on_device"):
        SingleGPUOffloadStrategy(backend="stream", initial_weights="cpu")


def test_meta_build_refuses_a_module_it_cannot_initialise() -> None:
    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.empty(32))
            with torch.no_grad():  # drawn like a meta tensor: the build cannot know these numbers
                self.scale.copy_(torch.randn_like(self.scale))

        def forward(self, x):
            return x * self.scale

    class WithScale(TinyLM):
        def configure_model(self) -> None:
            super().configure_model()
            self.scaled = Scaled()

    with pytest.raises(ValueError, match=r"`scaled` \(Scaled\) .*reset_parameters"):
        fit(stream(build_on_meta=True), precision="bf16-true", module=WithScale())


def test_llama_streams_embedding_and_head_built_on_meta() -> None:
    pytest.importorskip("transformers")
    from bench.runners import LlamaModule  # noqa: F401  (shape helpers only)
    from transformers import LlamaConfig, LlamaForCausalLM

    class TinyLlama(TinyLM):
        def configure_model(self) -> None:
            if self.net is None:
                config = LlamaConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=2,
                                     num_key_value_heads=1, vocab_size=64, tie_word_embeddings=False, use_cache=False)
                self.net = LlamaForCausalLM(config)

        def forward(self, tokens):
            return self.net(input_ids=tokens).logits

    module, trainer = fit(stream(build_on_meta=True), precision="bf16-true", module=TinyLlama(), num_batches=12)
    backend = backend_of(trainer)
    streamed = {backend.units[i].name for i in backend.placement.streamed}
    assert {"net.model.embed_tokens", "net.lm_head", "net.model.layers.0"} <= streamed
    rotary = module.net.model.rotary_emb
    expected = 1.0 / (rotary.config.rope_parameters["rope_theta"] ** (torch.arange(0, 16, 2).float() / 16))
    torch.testing.assert_close(rotary.inv_freq.float(), expected, rtol=1e-2, atol=0)  # bf16 under bf16-true
    assert module.losses[-1] < module.losses[0]


# ---------------------------------------------------------------------------------------------- checkpoints
def test_save_and_resume_reproduce_uninterrupted_losses(tmp_path) -> None:
    options = dict(precision="bf16-true", num_batches=4)
    uninterrupted, _ = fit(stream(), module=TinyLM(scheduler="step"), max_epochs=2, **options)
    first, trainer = fit(stream(), module=TinyLM(scheduler="step"), max_epochs=1, **options)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed, _ = fit(stream(), module=TinyLM(scheduler="step"), max_epochs=2, ckpt_path=str(tmp_path / "epoch1.ckpt"),
                     **options)
    assert first.losses + resumed.losses == uninterrupted.losses
    for a, b in zip(resumed.parameters(), uninterrupted.parameters()):
        assert torch.equal(a, b)


def optimizer_state(trainer) -> list[tuple[torch.Tensor, list[list[int]]]]:
    """Every unit's 8-bit AdamW records in host memory and the step counters its rounding bits depend on."""
    return [(unit.host_state.clone(), [list(entry.bucket.steps) for entry in unit.buckets])
            for unit in backend_of(trainer).units if unit.host_state is not None]


def test_model_checkpoint_written_during_fit_resumes_exactly(tmp_path) -> None:
    # The GPU run's shape (bench/studies/stream_resume.py): built on meta, some units resident and some streamed, the
    # checkpoint written by `ModelCheckpoint` between steps (slots still holding units) rather than after `fit`.
    options = dict(precision="bf16-true", num_batches=2, max_epochs=2)
    callback = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    uninterrupted, first = fit(stream(build_on_meta=True, resident_blocks=1), module=TinyLM(scheduler="step"),
                               enable_checkpointing=True, callbacks=[callback], **options)
    assert len(backend_of(first).placement.streamed) == 3  # position embedding, one block, final norm
    resumed, second = fit(stream(build_on_meta=True, resident_blocks=1), module=TinyLM(scheduler="step"),
                          ckpt_path=str(tmp_path / "epoch=0-step=2.ckpt"), **options)
    assert resumed.losses == uninterrupted.losses[2:]
    assert uninterrupted.losses[2] != uninterrupted.losses[0]  # epoch 2 repeats epoch 1's batches on new weights
    for a, b in zip(resumed.parameters(), uninterrupted.parameters(), strict=True):
        assert torch.equal(a, b)
    for (records, steps), (expected_records, expected_steps) in zip(optimizer_state(second), optimizer_state(first),
                                                                    strict=True):
        assert steps == expected_steps and {s for group in steps for s in group} == {4}
        assert torch.equal(records, expected_records)


def test_consolidated_state_dict_loads_into_plain_module(tmp_path) -> None:
    module, trainer = fit(stream(), precision="bf16-true")
    inputs = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        trained_logits = module(inputs).float()
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state_dict = lightning_offload.consolidate(tmp_path / "last.ckpt", tmp_path / "model.pt")
    assert {"net.embed.weight", "net.head.weight"} <= set(state_dict)
    plain = TinyLM()
    plain.configure_model()
    plain.load_state_dict(torch.load(tmp_path / "model.pt"))
    with torch.no_grad():  # in bf16, as trained: the consolidated fp32 values are the bf16 weights exactly
        torch.testing.assert_close(plain.bfloat16()(inputs).float(), trained_logits, atol=1e-3, rtol=1e-3)


def test_a_pinned_stream_backend_takes_the_planners_resident_blocks(monkeypatch) -> None:
    # The planner counts the activations and the loss when it sizes the resident blocks; the backend's own fallback
    # (fill the GPU up to `activation_reserve_gib`) must not override it. On the CPU the fallback keeps every block.
    import dataclasses

    import lightning_offload.strategy as strategy_module

    planned = strategy_module.plan_for_trainer

    def one_resident_block(*args, **kwargs):
        report = planned(*args, **kwargs)
        chosen = next(c for c in report.candidates if c.plan.resident_blocks == 1 and c.plan.checkpointing == "full")
        return dataclasses.replace(report, chosen=chosen)

    monkeypatch.setattr(strategy_module, "plan_for_trainer", one_resident_block)
    _, trainer = fit(SingleGPUOffloadStrategy(backend="stream", build_on_meta=False), num_batches=1,
                     precision="bf16-true")
    backend = backend_of(trainer)
    assert backend.resident_blocks == 1
    assert backend.placement.resident_blocks([UnitSize(0, 0, u.is_block) for u in backend.units]) == 1
