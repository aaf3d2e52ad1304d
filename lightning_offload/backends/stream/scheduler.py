"""The schedule: which copy runs when, into which GPU slot, and which event each side waits on.

Rules (each one is what keeps a copy from racing the compute that reads or writes the same memory):
- A streamed unit's weights come into a free weight slot on the h2d lane; the copy waits on the last use of the
  slot's previous contents on every lane since it was filled, and on the d2h copy that last wrote the unit's host
  weights.
- Compute waits on the load event before it uses a slot; after a forward it records the event that frees it.
- Streamed units run under non-reentrant activation checkpointing, so in backward their recompute loads them
  again and nothing saved in forward points into a slot that was reused since.
- When a unit's gradients are final (its parameters' post-accumulate-grad hooks have all fired) and this backward
  precedes the optimizer step, its 8-bit state (loaded into a state slot ahead of time) and gradients feed one
  fused AdamW launch on the compute lane; the d2h lane waits for it and copies the state (and streamed weights)
  back; that copy's event frees both slots and guards the next load of the same host memory.
- Loads are issued in the order units will run (forward: registration order; backward: its reverse) as far ahead
  as free slots allow. A freed slot keeps its contents until overwritten, so a unit needed again soon (the last
  block, from the end of forward to the start of backward) is not copied twice. Such a slot is used again without
  a refill: its next overwrite (a load, or the update writing it in place) also waits for the d2h copy that saved
  it last, which a forward's release alone does not cover.
- Accumulating, a streamed unit's gradients leave the GPU after each micro-batch that does not step: compute copies
  them (first micro-batch) or adds them (later ones, onto the sum loaded ahead from host memory) into a gradient
  slot, and the d2h lane saves the slot to the unit's host sum; the micro-batch that steps adds the loaded sum to
  the unit's gradients before its update. Each load of a sum waits for its last save.
- A block whose state lives on disk (`disk.DiskTier`) has it read into a pinned staging buffer ahead of its update;
  its state load copies from that buffer once the read is done, and the save after the update copies back into it,
  to be written to its file once that copy is done.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from lightning_offload.activation_checkpointing import _WRAPPED, unwrapped_forward
from lightning_offload.backends.stream.disk import DiskTier
from lightning_offload.backends.stream.lanes import COMPUTE, D2H, H2D, Lanes, Mark
from lightning_offload.backends.stream.units import Unit

WEIGHTS, STATE, GRADIENTS = "weights", "state", "gradients"


@dataclass(eq=False)
class Slot:
    buffer: torch.Tensor
    name: str
    unit: Unit | None = None
    """Whose data the buffer holds (or is receiving)."""
    loaded: Mark | None = None
    reusable: dict[str, Mark] = field(default_factory=dict)
    """The last use of the buffer on each lane since it was filled: it may be overwritten once all are reached.
    A slot kept for its unit is used again without a refill, and its next release must not drop the d2h copy that
    still reads it from the previous release (a lane runs in order, so only its latest mark is kept)."""
    reserved: bool = False
    """Held for `unit`: loaded ahead of use, or in use."""
    released_at: int = 0


class SlotPool:
    def __init__(self, kind: str, nbytes: int, count: int, device: torch.device) -> None:
        self.kind = kind
        self.slots = [Slot(torch.empty(nbytes, dtype=torch.uint8, device=device), f"{kind} slot {i}")
                      for i in range(count if nbytes else 0)]

    def holding(self, unit: Unit) -> Slot | None:
        return next((s for s in self.slots if s.unit is unit), None)

    def least_recently_released(self) -> Slot | None:
        free = [s for s in self.slots if not s.reserved]
        return min(free, key=lambda s: s.released_at) if free else None

    def invalidate(self) -> None:
        for slot in self.slots:
            slot.unit = None


class Scheduler:
    """Drives one model's units through forward, backward and the update inside backward.

    `update(unit, states)` runs the unit's optimizer step on the compute lane with its state in the `states`
    regions (one per bucket); `gradient_ready` is called by each parameter's post-accumulate-grad hook.
    """

    def __init__(self, units: list[Unit], lanes: Lanes, dtype: torch.dtype, weights: SlotPool, states: SlotPool,
                 update: Callable[[Unit, list[torch.Tensor]], None]) -> None:
        self.units, self.lanes, self.dtype = units, lanes, dtype
        self.weights, self.states, self.update = weights, states, update
        self.gradients = SlotPool(GRADIENTS, 0, 0, torch.device("cpu"))
        """Set by the backend when gradients accumulate over micro-batches (`Unit.host_gradients`)."""
        self.summed: dict[int, set[int]] = {}
        """Per streamed unit, the positions of the parameters whose gradients so far are summed in host memory."""
        self.in_backward = False
        self.updating = False
        self.position = 0
        self.arrived: dict[int, int] = {}
        self.finished: set[int] = set()
        self.touched: set[int] = set()
        self.in_use: dict[int, Slot] = {}
        self.host_written: dict[tuple[str, int], Mark] = {}
        self.disk: DiskTier | None = None
        """Set by the backend when some blocks' state lives on disk."""
        self._clock = 0

    # ---------------------------------------------------------------- modules
    def install(self) -> None:
        """Wraps the forward of every streamed unit and hooks resident ones for prefetching."""
        for unit in self.units:
            for module in unit.modules:
                if unit.streamed:
                    module.forward = self._streamed_forward(unit, _plain_forward(module))
                    setattr(module, _WRAPPED, True)
            if not unit.streamed:
                # Its first module only: a tied output layer, run last, must not move the prefetch back to the start.
                unit.modules[0].register_forward_pre_hook(lambda *_, unit=unit: self.enter(unit))

    def _streamed_forward(self, unit: Unit, forward: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            self.acquire(unit)
            try:
                return forward(*args, **kwargs)
            finally:
                self.after_forward(unit)

        def streamed(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return run(*args, **kwargs)
            return checkpoint(run, *args, use_reentrant=False, **kwargs)

        return streamed

    # ---------------------------------------------------------------- forward
    def enter(self, unit: Unit) -> None:
        self.position = unit.index
        if self.in_backward:
            self.touched.add(unit.index)
        self._pump()

    def acquire(self, unit: Unit) -> None:
        """Makes the unit's parameters views of a loaded slot; compute waits for the load."""
        self.enter(unit)
        slot = self.in_use.get(unit.index) or self._load(self.weights, unit, evict=True)
        self.lanes.wait(COMPUTE, slot.loaded)
        self.lanes.touch(COMPUTE, reads=(slot.name,))
        self.in_use[unit.index] = slot
        for param, view in zip(unit.params, unit.views(slot.buffer, self.dtype)):
            param.data = view

    def after_forward(self, unit: Unit) -> None:
        # In backward this is the recompute: the weights stay until the unit's gradients are final.
        if not self.in_backward:
            used = self._compute_done([self.in_use.get(unit.index)], f"used weights {unit.index}")
            self._release_weights(unit, used)

    def _release_weights(self, unit: Unit, reusable: Mark) -> None:
        slot = self.in_use.pop(unit.index, None)
        if slot is not None:
            self._release(slot, reusable)
        if unit.streamed:
            for param, view in zip(unit.params, unit.views(unit.host_weights, self.dtype)):
                param.data = view

    def _compute_done(self, slots: list[Slot | None], label: str) -> Mark:
        """The event after which compute no longer reads `slots` (its last read is logged just before it)."""
        self.lanes.touch(COMPUTE, reads=tuple(slot.name for slot in slots if slot is not None))
        return self.lanes.record(COMPUTE, label)

    def _release(self, slot: Slot, reusable: Mark) -> None:
        self._clock += 1
        slot.reserved, slot.released_at = False, self._clock
        slot.reusable[reusable.lane] = reusable

    # ---------------------------------------------------------------- backward
    def begin_backward(self, update: bool) -> None:
        self.in_backward, self.updating = True, update
        self.position = len(self.units) - 1
        self.arrived, self.finished, self.touched = {}, set(), set()
        self._pump()

    def gradient_ready(self, unit: Unit) -> None:
        if not self.in_backward:
            raise RuntimeError(
                "A gradient arrived outside a backward the `stream` backend was told about. Call backward through "
                "Lightning (`self.manual_backward(loss)` with manual optimization), not `loss.backward()`."
            )
        self.touched.add(unit.index)
        self.arrived[unit.index] = self.arrived.get(unit.index, 0) + 1
        if self.arrived[unit.index] == unit.trainable:
            self.finish(unit)

    def finish(self, unit: Unit) -> None:
        """The unit's gradients are final for this backward: update it, or keep its gradients for the next one."""
        self.finished.add(unit.index)
        self.position = min(self.position, unit.index)
        if self.updating and unit.buckets and unit.streamed and unit.index not in self.in_use:
            self.acquire(unit)  # gradients arrived without a recompute (an unusual call order): the update needs it
        if not self.updating and unit.host_gradients is not None:
            self._save_gradients(unit)
        if not (self.updating and unit.buckets):
            self._release_weights(unit, self._compute_done([self.in_use.get(unit.index)],
                                                           f"backward done {unit.index}"))
            self._pump()
            return
        if unit.index in self.summed:
            self._add_saved_gradients(unit)
        state_slot = self._load(self.states, unit, evict=True)
        self.lanes.wait(COMPUTE, state_slot.loaded)
        weight_slot = self.in_use.get(unit.index) if unit.streamed else None
        written = [slot for slot in (state_slot, weight_slot) if slot is not None]
        for slot in written:  # kept from an earlier step: its last save to the host may still be reading it
            for mark in slot.reusable.values():
                self.lanes.wait(COMPUTE, mark)
        self.lanes.touch(COMPUTE, writes=tuple(slot.name for slot in written))
        with self.lanes.timed(COMPUTE, f"update {unit.index}"):
            self.update(unit, unit.state_views(state_slot.buffer))
        self.lanes.log.append(("update", COMPUTE, str(unit.index)))
        updated = self.lanes.record(COMPUTE, f"updated {unit.index}")
        self.lanes.wait(D2H, updated)
        staging = None
        if unit.on_disk:
            assert self.disk is not None
            staging, at_rest = self.disk.save_buffer(unit)
            self.lanes.wait(D2H, at_rest)
        self.lanes.copy(D2H, staging.tensor[:unit.state_bytes] if staging else unit.host_state,
                        state_slot.buffer[:unit.state_bytes], f"save state {unit.index}", reads=state_slot.name,
                        writes=staging.name if staging else _host(STATE, unit))
        if weight_slot is not None:
            self.lanes.copy(D2H, unit.host_weights, weight_slot.buffer[:unit.weight_bytes],
                            f"save weights {unit.index}", reads=weight_slot.name, writes=_host(WEIGHTS, unit))
        saved = self.lanes.record(D2H, f"saved {unit.index}")
        self.host_written[(STATE, unit.index)] = saved
        if unit.streamed:
            self.host_written[(WEIGHTS, unit.index)] = saved
        if staging is not None:
            self.disk.write_back(staging, saved)  # type: ignore[union-attr]
        self._release(state_slot, saved)
        self._release_weights(unit, saved)
        for param in unit.params:
            param.grad = None
        self._pump()

    def _save_gradients(self, unit: Unit) -> None:
        """Moves the unit's gradients of a micro-batch that does not step into its sum in host memory."""
        arrived = {i for i, param in enumerate(unit.params) if param.grad is not None}
        if not arrived:
            return
        summed = self.summed.get(unit.index, set())
        slot = self._load(self.gradients, unit, evict=True) if summed else self._claim(self.gradients, unit)
        self.lanes.wait(COMPUTE, slot.loaded)  # the sum loaded into it, or a load still filling it for another unit
        for mark in slot.reusable.values():  # its last save to the host may still be reading it
            self.lanes.wait(COMPUTE, mark)
        self.lanes.touch(COMPUTE, reads=(slot.name,) if summed else (), writes=(slot.name,))
        with torch.no_grad():
            for i, (view, param) in enumerate(zip(unit.views(slot.buffer, self.dtype), unit.params)):
                if i in summed and i in arrived:
                    view.add_(param.grad)
                elif i in arrived:
                    view.copy_(param.grad)
                param.grad = None
        self.summed[unit.index] = summed | arrived
        added = self.lanes.record(COMPUTE, f"gradients summed {unit.index}")
        self.lanes.wait(D2H, added)
        self.lanes.copy(D2H, unit.host_gradients, slot.buffer[:unit.weight_bytes], f"save gradients {unit.index}",
                        reads=slot.name, writes=_host(GRADIENTS, unit))
        saved = self.lanes.record(D2H, f"saved gradients {unit.index}")
        self.host_written[(GRADIENTS, unit.index)] = saved
        self._release(slot, saved)

    def _add_saved_gradients(self, unit: Unit) -> None:
        """The micro-batch that steps: the unit's gradients become the sum over every micro-batch, as autograd
        accumulates them (each parameter's earlier sum plus this micro-batch's gradient, where either exists)."""
        summed = self.summed.pop(unit.index)
        slot = self._load(self.gradients, unit, evict=True)
        self.lanes.wait(COMPUTE, slot.loaded)
        self.lanes.touch(COMPUTE, reads=(slot.name,))
        with torch.no_grad():
            for i, (view, param) in enumerate(zip(unit.views(slot.buffer, self.dtype), unit.params)):
                if i in summed and param.grad is None:
                    param.grad = view.clone()
                elif i in summed:
                    param.grad.add_(view)
        self._release(slot, self.lanes.record(COMPUTE, f"gradients read {unit.index}"))
        slot.unit = None  # the sum is spent: the next micro-batch starts a new one

    def _claim(self, pool: SlotPool, unit: Unit) -> Slot:
        """A slot for `unit` that compute fills from scratch (nothing is loaded into it)."""
        for slot in pool.slots:
            if slot.unit is unit:
                slot.unit = None
        slot = pool.least_recently_released() or self._evict(pool)
        slot.unit, slot.reserved = unit, True
        return slot

    def end_backward(self) -> None:
        """Updates units whose gradients did not all arrive (unused parameters, or ones whose gradients arrived in
        earlier micro-batches only), then frees every slot."""
        unfinished = self.touched | set(self.summed) if self.updating else self.touched
        for index in sorted(unfinished - self.finished, reverse=True):
            self.finish(self.units[index])
        held = [*self.in_use.values(),
                *(s for pool in (self.weights, self.states, self.gradients) for s in pool.slots if s.reserved)]
        after = self._compute_done(held, "backward end")
        for index in list(self.in_use):
            self._release_weights(self.units[index], after)
        for pool in (self.weights, self.states, self.gradients):
            for slot in pool.slots:
                if slot.reserved:
                    self._release(slot, after)
        self.in_backward = self.updating = False

    # ---------------------------------------------------------------- loads
    def _pump(self) -> None:
        """Issues loads for the next units in running order while slots are free."""
        if self.in_backward:
            upcoming = [u for u in reversed(self.units[:self.position + 1]) if u.index not in self.finished]
        else:
            upcoming = [u for u in self.units[self.position:] if u.streamed]
        if self.disk is not None:
            self.disk.poll()
            if self.in_backward and self.updating:
                self.disk.read_ahead([u for u in upcoming if u.on_disk and u.buckets and
                                      self.states.holding(u) is None])
        for unit in upcoming:
            if unit.streamed and unit.index not in self.in_use and not self._load(self.weights, unit, evict=False):
                return
            if self.in_backward and self.updating and unit.buckets and not self._load(self.states, unit, evict=False):
                return
            if self.in_backward and unit.index in self.summed and not self._load(self.gradients, unit, evict=False):
                return

    def _load(self, pool: SlotPool, unit: Unit, *, evict: bool) -> Slot | None:
        slot = pool.holding(unit)
        if slot is not None:
            slot.reserved = True
            return slot
        slot = pool.least_recently_released()
        if slot is None and evict:
            slot = self._evict(pool)
        if slot is None:
            return None
        source = {WEIGHTS: unit.host_weights, STATE: unit.host_state, GRADIENTS: unit.host_gradients}[pool.kind]
        source_name = _host(pool.kind, unit)
        if pool.kind == STATE and unit.on_disk:
            assert self.disk is not None
            staged = self.disk.staged(unit, block=evict)
            if staged is None:  # its read is not done yet: loaded at a later pump, or when its update needs it
                return None
            buffer, read = staged
            source, source_name = buffer.tensor[:unit.state_bytes], buffer.name
            self.lanes.wait(H2D, read)
        for mark in slot.reusable.values():
            self.lanes.wait(H2D, mark)
        self.lanes.wait(H2D, self.host_written.get((pool.kind, unit.index)))
        self.lanes.copy(H2D, slot.buffer[:source.numel()], source, f"load {pool.kind} {unit.index}",
                        reads=source_name, writes=slot.name)
        slot.loaded = self.lanes.record(H2D, f"loaded {pool.kind} {unit.index}")
        slot.reusable = {}  # the refill waited for every earlier use; later ones wait for `loaded`
        slot.unit, slot.reserved = unit, True
        return slot

    def _evict(self, pool: SlotPool) -> Slot:
        """A slot loaded ahead for a unit not yet running gives way to the unit that runs now."""
        in_use = {id(s) for s in self.in_use.values()}
        ahead = [s for s in pool.slots if id(s) not in in_use]
        if not ahead:
            raise RuntimeError(
                f"All {len(pool.slots)} {pool.kind} slots of the `stream` backend are in use at once; the model runs "
                f"its units in an order the prefetch did not expect. Raise `{pool.kind.rstrip('s')}_slots`."
            )
        slot = max(ahead, key=lambda s: abs(s.unit.index - self.position) if s.unit else 0)
        slot.reserved = False
        return slot

    def invalidate(self) -> None:
        """Host copies changed (a checkpoint was loaded): nothing cached in a slot is current any more."""
        self.lanes.synchronize()
        self.weights.invalidate()
        self.states.invalidate()
        self.gradients.invalidate()
        self.summed = {}
        if self.disk is not None:
            self.disk.flush()


def _host(kind: str, unit: Unit) -> str:
    return f"host {kind} {unit.index}"


def _plain_forward(module: torch.nn.Module) -> Callable[..., Any]:
    """The module's forward without other activation checkpointing: streamed units are checkpointed here, and a
    second checkpoint around the same block would recompute it twice."""
    if getattr(module, "gradient_checkpointing", False):  # transformers checkpoints inside `__call__`
        module.gradient_checkpointing = False
    return unwrapped_forward(module)
