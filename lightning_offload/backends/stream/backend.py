"""`StreamBackend`: the Lightning seam of the streaming plan (see the package docstring for the plan itself)."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_offload.backends.base import (DEVICE_TO_HOST, HOST_TO_DEVICE, Backend, BackendConfig, LastEngine,
                                             TrainingSetup, copy_weights_by_name, persistent_buffers)
from lightning_offload.backends.stream import checkpoint as stream_checkpoint
from lightning_offload.backends.stream.checkpoint import PARAM_GROUPS
from lightning_offload.backends.stream.disk import DiskTier
from lightning_offload.backends.stream.from_pretrained_refused import from_pretrained_refused
from lightning_offload.backends.stream.lanes import D2H, H2D, HostArena, Lanes, aligned
from lightning_offload.backends.stream.optimizer import StreamAdamW, as_stream_adamw, build_buckets, update_buckets
from lightning_offload.backends.stream.parameters_on_meta import InitRecord, parameters_on_meta
from lightning_offload.backends.stream.placement import (
    DISK_BUFFERS,
    GRADIENT_SLOTS,
    Placement,
    UnitSize,
    check_host_memory,
    measure,
    place_state_on_disk,
    place_units,
)
from lightning_offload.backends.stream.scheduler import GRADIENTS, STATE, WEIGHTS, Scheduler, SlotPool
from lightning_offload.backends.stream.units import (
    Unit,
    check_meta_initialisable,
    find_units,
    initial_weights,
    initialise,
    materialise_buffers,
    replace_parameters,
)
from lightning_offload.kernels.format import BLOCK_SIZE, RECORD_BYTES
from lightning_offload.planner.budget import GIB, gpu_free_bytes
from lightning_offload.saving import checkpoints_on_disk_at_once

INITIAL_WEIGHTS = ("as_auto", "on_device")
_PRECISIONS = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "32-true": torch.float32}


@dataclass(kw_only=True)
class StreamConfig(BackendConfig):
    resident_blocks: int | None = None
    """Blocks whose weights stay on the GPU; None: the planner's choice (it counts the activations and the loss),
    or without a plan (`check_memory=False`) as many as fit beside `activation_reserve_gib`."""
    activation_reserve_gib: float = 16.0
    """GPU memory kept for activations, the loss and the allocator's slack when choosing `resident_blocks`."""
    stream_outer: bool = False
    """Also stream the units outside the blocks (embedding, final norm, output layer). They stream anyway when
    streaming every block does not fit."""
    weight_slots: int = 3
    """GPU slots for streamed weights: 2 double-buffers; 3 lets a load start while the previous unit's updated
    weights still drain to the host."""
    state_slots: int = 3
    """GPU slots for 8-bit optimizer state on its way through the update."""
    pin_memory: bool = True
    """Page-lock the host arenas (one `cudaHostRegister` each): copies run ~6x faster than from pageable memory."""
    build_on_meta: bool = True
    """Build `configure_model` with its parameters on the meta device (its buffers computed by their constructors,
    in host memory) and give each unit its weights where it will live: no full host copy. False builds the model in
    host memory first."""
    initial_weights: str = "as_auto"
    """How a model built on meta gets its initial weights. "as_auto": the build records what initialises each
    parameter and draws the random numbers `strategy="auto"` draws (on the CPU, one after another: about the time
    building the model in host memory takes, minutes at 30B); each unit replays its record where it lives, so the
    weights and the random generators after `configure_model` are auto's, bit for bit. "on_device": each unit is
    initialised where it lives by its modules' `reset_parameters()` (or their `transformers` model's
    `_init_weights`), in seconds, from generators of its own: the same distributions, other numbers than auto's, and
    the global generators left as `configure_model` found them."""
    host_reserve_gib: float = 4.0
    """Host memory left free beside the pinned arenas when checking that the plan fits."""
    block_classes: list[str] = field(default_factory=list)
    """Class names of the repeated blocks; empty: detected (`activation_checkpointing.find_blocks`)."""
    stochastic_rounding: bool = True
    seed: int = 0
    """Seed of the stochastic-rounding bits (a resumed run draws the same ones)."""
    timing: bool = False
    """Time every copy and update with CUDA events (`backend.phase_seconds()`), for the benchmark."""
    nvme_path: str | None = None
    """A folder on a local NVMe drive where the 8-bit optimizer state of some blocks lives when host memory cannot
    hold it all (read ahead of each block's update and written back after it, with DeepSpeed's async I/O; needs
    libaio). None: all state in host memory."""
    disk_blocks: int | None = None
    """Blocks whose optimizer state lives under `nvme_path`; None: the planner's choice, or without a plan the
    fewest that let the pinned host memory fit in what is available (within `max_host_memory_gib` and the job's
    memory limit; 0 when it fits)."""
    disk_buffers: int = DISK_BUFFERS
    """Pinned staging buffers, each one block's state, that the disk reads and writes go through: one per state
    slot on its way to an update and at least one more for reading ahead and writing back."""

    def __post_init__(self) -> None:
        if self.initial_weights not in INITIAL_WEIGHTS:
            raise ValueError(f"`initial_weights={self.initial_weights!r}`: choose one of {', '.join(INITIAL_WEIGHTS)}.")
        if self.disk_blocks and self.nvme_path is None:
            raise ValueError(f"`disk_blocks={self.disk_blocks}` needs a folder for the state: pass `nvme_path=...`.")
        if self.nvme_path is not None and self.disk_buffers < self.state_slots + 1:
            raise ValueError(f"`disk_buffers={self.disk_buffers}` must be at least `state_slots` + 1 = "
                             f"{self.state_slots + 1}: each state slot holds a block's buffer until its update, and "
                             "one more reads ahead and writes back.")


class StreamBackend(Backend):
    name = "stream"
    Config = StreamConfig
    saves_own_state = True
    options_under_auto = frozenset({"initial_weights"})
    manual_optimization_refusal = "it updates each block's parameters as its gradients arrive during backward."
    gradient_hooks_refusal = "updates each block's parameters, and frees their gradients, during backward."
    precisions = tuple(_PRECISIONS)
    precision_advice = (", which keeps bf16 weights updated with stochastic rounding. Use 'bf16-mixed' or 'bf16-true' "
                        "('32-true' keeps fp32 weights, at twice the memory)")
    clipping_refusals = dict.fromkeys(
        ("norm", "value"),
        "updates each block inside backward, before a global gradient norm exists, so it cannot clip by it. Drop "
        "`gradient_clip_val`, or use `backend='deepspeed'` (clips exactly) for this run.",
    )
    # Held weakly: the engine holds the module, so a run the user dropped is freed with it (the arenas unpin their
    # memory when collected).
    _live: ClassVar[LastEngine[StreamBackend]] = LastEngine(weak=True)

    def __init__(self, config: StreamConfig) -> None:
        super().__init__(config)
        self.config: StreamConfig = config
        self._device = torch.device("cpu")
        self._precision = "bf16-mixed"
        self._root: nn.Module | None = None
        self.units: list[Unit] = []
        self.placement: Placement | None = None
        self.scheduler: Scheduler | None = None
        self.optimizer: StreamAdamW | None = None
        self._arenas: list[HostArena] = []
        self._hooks: list[Any] = []
        self._state_arena: HostArena | None = None
        self._gradient_arena: HostArena | None = None
        self.disk: DiskTier | None = None

    @property
    def resident_blocks(self) -> int | None:
        """The configured count, else the planner's (None: fill the GPU up to `activation_reserve_gib`)."""
        return self.configured_or_planned("resident_blocks", None)

    @property
    def dtype(self) -> torch.dtype:
        return _PRECISIONS[self._precision]

    def setup_environment(self, device: torch.device) -> None:
        self._device = device

    @contextmanager
    def model_init_context(self) -> Iterator[None]:
        if not self.config.build_on_meta:
            yield
            return
        as_auto = self.config.initial_weights == "as_auto"
        # Recording auto's initial weights: on the device auto builds on, whose generator (CUDA's) draws them.
        with torch.device(self._device) if as_auto else nullcontext(), parameters_on_meta(record=as_auto), \
                from_pretrained_refused():
            yield

    # ------------------------------------------------------------------ building
    def prepare_module(self, module: nn.Module) -> nn.Module:
        if self._root is module:
            return module
        previous = StreamBackend._live.take()
        if previous is not None:
            previous.release()
        trainer = getattr(module, "_trainer", None)
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        self.units = find_units(module, self.config.block_classes)
        if any(p.is_meta for p in module.parameters()) or any(b.is_meta for b in module.buffers()):
            check_meta_initialisable(module)
        for unit in self.units:
            unit.lay_out(self.dtype)
        self.placement = self._place(accumulate)
        self._check_disk_for_checkpoints(trainer)
        self._arenas.append(HostArena(sum(self.units[i].weight_bytes for i in self.placement.streamed),
                                      pin=self._pinning()))
        self.lanes = Lanes(self._device, timing=self.config.timing)
        weights = SlotPool(WEIGHTS, self.placement.ring_weight_bytes, self.config.weight_slots, self._device)
        states = SlotPool(STATE, self.placement.ring_state_bytes, self.config.state_slots, self._device)
        for unit in self.units:
            unit.streamed = unit.index in self.placement.streamed
            unit.on_disk = unit.index in self.placement.on_disk
            self._materialise(module, unit, weights)
        materialise_buffers(module, self._device)
        self.scheduler = Scheduler(self.units, self.lanes, self.dtype, weights, states, self._update)
        self.scheduler.install()
        self._root = module
        StreamBackend._live.keep(self)
        return module

    def _pinning(self) -> bool:
        return self.config.pin_memory and self._device.type == "cuda"

    def _place(self, accumulate: int) -> Placement:
        sizes = self._unit_sizes()
        if self._device.type == "cuda":
            gpu_free = gpu_free_bytes(self._device) - int(self.config.activation_reserve_gib * GIB)
        else:  # the CPU stands in for the device: everything fits unless `resident_blocks` says otherwise
            gpu_free = 2**62
        placement = place_units(sizes, gpu_free_bytes=gpu_free, weight_slots=self.config.weight_slots,
                                state_slots=self.config.state_slots, accumulate=accumulate,
                                resident_blocks=self.resident_blocks, stream_outer=self.config.stream_outer)
        if accumulate > 1 and placement.gpu_bytes > gpu_free:
            kept = sum(size.weight_bytes for i, size in enumerate(sizes) if i not in placement.streamed)
            raise MemoryError(
                f"`accumulate_grad_batches={accumulate}` keeps the resident units' gradients on the GPU between "
                f"micro-batches ({kept / GIB:.1f} GiB), which does not fit beside their weights: "
                f"{len(sizes) - len(placement.streamed)} units are resident. "
                "Choose fewer `resident_blocks` (streamed blocks' gradients are summed in host memory), or use "
                "`accumulate_grad_batches=1` with a larger micro-batch."
            )
        room, reserve = self.host_memory_available(), int(self.config.host_reserve_gib * GIB)
        disk_blocks = self.configured_or_planned("disk_blocks", None)
        if self.config.nvme_path is not None:
            from lightning_offload.planner.disk import check_disk_path, check_disk_room

            folder = check_disk_path(self.config.nvme_path)
            placement = place_state_on_disk(sizes, placement, host_free_bytes=room.bytes - reserve,
                                            disk_blocks=disk_blocks, disk_buffers=self.config.disk_buffers,
                                            weight_slots=self.config.weight_slots,
                                            state_slots=self.config.state_slots, accumulate=accumulate)
            check_disk_room(folder, placement.disk_bytes,
                            what=f"the optimizer state of {len(placement.on_disk)} blocks (the `stream` backend's "
                                 "disk tier)")
        check_host_memory(placement, available_bytes=room.bytes, reserve_bytes=reserve, limit=room.limit)
        return placement

    def _unit_sizes(self) -> list[UnitSize]:
        return [UnitSize(u.weight_bytes, _state_bytes(u.params), u.is_block, can_stream=len(u.modules) == 1)
                for u in self.units]

    def _check_disk_for_checkpoints(self, trainer: Any) -> None:
        for callback in getattr(trainer, "checkpoint_callbacks", None) or []:
            dirpath = getattr(callback, "dirpath", None)
            copies = checkpoints_on_disk_at_once(getattr(callback, "save_top_k", 1),
                                                 getattr(callback, "save_last", False))
            if dirpath and copies:
                needed = copies * sum(u.weight_bytes + _state_bytes(u.params) for u in self.units)
                stream_checkpoint.check_disk(Path(dirpath), needed,
                                             f"`ModelCheckpoint` ({copies} checkpoint(s) on disk at once while saving)")

    def _materialise(self, root: nn.Module, unit: Unit, weights: SlotPool) -> None:
        """Gives the unit real weights where they will live: on the device, or in the host arena (built on the
        device in a slot first when a module's initialiser draws them)."""
        meta = any(p.is_meta for p in unit.params)
        sources = [initial_weights(p) for p in unit.params]
        # Weights read from a checkpoint or replayed from the build's record go straight to the host arena.
        initialised = meta and any(source is None for source in sources)
        if unit.streamed:
            unit.host_weights = self._arenas[-1].take(unit.weight_bytes)
            homes = unit.views(unit.host_weights, self.dtype)
            targets = unit.views(weights.slots[0].buffer, self.dtype) if initialised else homes
        else:
            homes = targets = [torch.empty(p.shape, dtype=self.dtype, device=self._device) for p in unit.params]
        new = {}
        for param, target in zip(unit.params, targets):
            if not param.is_floating_point():
                raise ValueError(f"Parameter {unit.names[0]} of dtype {param.dtype}: the `stream` backend trains "
                                 "floating-point parameters only.")
            if not meta:
                target.copy_(param.detach())
            new[id(param)] = nn.Parameter(target, requires_grad=param.requires_grad)
        replace_parameters(root, new)
        unit.params = [new[id(p)] for p in unit.params]
        if meta:
            # A module whose weights the build could not record is initialised by its own initialiser, with its
            # buffers, as its constructor would; drawing from generators of its own, as the user's are theirs.
            known = {id(p) for p, source in zip(unit.params, sources) if source is not None}
            with torch.random.fork_rng(devices=[self._device] if self._device.type == "cuda" else []):
                for module in unit.modules:
                    for sub in module.modules():
                        if any(id(p) not in known for p in sub.parameters(recurse=False)):
                            initialise(sub, root, self._device)
            replays = [(target, source) for target, source in zip(targets, sources) if isinstance(source, InitRecord)]
            with ThreadPoolExecutor(max(1, min(len(replays), torch.get_num_threads()))) as pool:
                list(pool.map(lambda pair: pair[1].read_into(pair[0]), replays))
            for target, source in zip(targets, sources):
                if source is not None and not isinstance(source, InitRecord):
                    source.read_into(target)
            if unit.streamed and initialised:
                for home, target, param in zip(homes, targets, unit.params):
                    home.copy_(target)
                    param.data = home

    # ------------------------------------------------------------------ training
    def prepare_optimizer(self, optimizer: Optimizer) -> Optimizer:
        return as_stream_adamw(optimizer, stochastic_rounding=self.config.stochastic_rounding, seed=self.config.seed)

    def setup_training(self, module: nn.Module, optimizer: Optimizer, setup: TrainingSetup) -> tuple[nn.Module,
                                                                                                     Optimizer]:
        assert isinstance(optimizer, StreamAdamW) and self.scheduler is not None
        self._check_accumulation(setup.accumulate_grad_batches)
        grouped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        orphans = [u.names[i][0] for u in self.units for i, p in enumerate(u.params)
                   if p.requires_grad and id(p) not in grouped]
        if orphans:
            raise ValueError(
                f"Parameters {orphans[:3]}{'...' if len(orphans) > 3 else ''} require gradients but are in no param "
                "group of the optimizer: the `stream` backend would never update them nor free their gradients. "
                "Add them to `configure_optimizers` or set `requires_grad=False`."
            )
        self._drop_optimizer_state()
        self.optimizer = optimizer
        for unit in self.units:
            unit.buckets = build_buckets(unit.params, optimizer)
            unit.trainable = sum(1 for p in unit.params if p.requires_grad)
        total_state = sum(_aligned_state(u) for u in self.units if not u.on_disk)
        self._state_arena = HostArena(total_state, pin=self._pinning())
        self._arenas.append(self._state_arena)
        for unit in self.units:
            unit.state_offsets, offset = [], 0
            for entry in unit.buckets:
                unit.state_offsets.append(offset)
                offset += entry.bucket.num_blocks * RECORD_BYTES
            unit.state_bytes = offset
            unit.on_disk = unit.on_disk and offset > 0
            unit.host_state = self._arenas[-1].take(offset) if offset and not unit.on_disk else None
        self._sum_streamed_gradients_on_host(setup.accumulate_grad_batches)
        if any(unit.on_disk for unit in self.units):
            assert self.config.nvme_path is not None
            self.disk = DiskTier(self.config.nvme_path, self.units, self.lanes, buffers=self.config.disk_buffers,
                                 pin=self._pinning())
            self.scheduler.disk = self.disk
        for unit in self.units:
            for param in unit.params:
                if param.requires_grad:
                    self._hooks.append(param.register_post_accumulate_grad_hook(
                        functools.partial(_gradient_ready, weakref.ref(self), weakref.ref(unit))))
        return module, optimizer

    def _sum_streamed_gradients_on_host(self, accumulate: int) -> None:
        """Accumulating, each streamed unit's gradients are summed in host memory between micro-batches, passing
        through a ring of GPU slots; otherwise none of it exists."""
        assert self.placement is not None and self.scheduler is not None
        streamed = [unit for unit in self.units if unit.streamed and unit.trainable] if accumulate > 1 else []
        for unit in self.units:
            unit.host_gradients = None
        if streamed:
            self._gradient_arena = HostArena(sum(unit.weight_bytes for unit in streamed), pin=self._pinning())
            self._arenas.append(self._gradient_arena)
            for unit in streamed:
                unit.host_gradients = self._gradient_arena.take(unit.weight_bytes)
        ring = max((unit.weight_bytes for unit in streamed), default=0)
        self.scheduler.gradients = SlotPool(GRADIENTS, ring, GRADIENT_SLOTS, self._device)
        self.scheduler.summed = {}

    def _drop_optimizer_state(self) -> None:
        """A later `fit` steps the fresh optimizer its `configure_optimizers` returned, as under `auto`: the earlier
        fit's state and its update hooks (which would update each unit twice) go."""
        self.lanes.synchronize()
        self._remove_hooks_and_disk()
        self.scheduler.disk = None
        for arena in (self._state_arena, self._gradient_arena):
            if arena is not None:
                self._arenas.remove(arena)
                arena.release()
        self._state_arena = self._gradient_arena = None

    def _check_accumulation(self, accumulate: int) -> None:
        """Refuses accumulation the placement did not count (it was made before the trainer was known) and that does
        not fit: the resident units' gradients on the GPU, the streamed units' sums in host memory."""
        assert self.placement is not None
        if accumulate == 1:
            return
        need = measure(self._unit_sizes(), self.placement.streamed, weight_slots=self.config.weight_slots,
                       state_slots=self.config.state_slots, accumulate=accumulate, on_disk=self.placement.on_disk,
                       disk_buffers=self.config.disk_buffers)
        if self._device.type == "cuda":
            more = need.gpu_bytes - self.placement.gpu_bytes
            free = gpu_free_bytes(self._device) - int(self.config.activation_reserve_gib * GIB)
            if more > free:
                raise MemoryError(
                    f"`accumulate_grad_batches={accumulate}` keeps the resident units' gradients on the GPU between "
                    f"micro-batches; that needs {more / GIB:.1f} GiB more than is free. Choose fewer "
                    "`resident_blocks`, or use `accumulate_grad_batches=1` with a larger micro-batch."
                )
        if need.host_pinned_bytes > self.placement.host_pinned_bytes:
            room, held = self.host_memory_available(), sum(arena.buffer.numel() for arena in self._arenas)
            check_host_memory(need, available_bytes=room.bytes + held,
                              reserve_bytes=int(self.config.host_reserve_gib * GIB), limit=room.limit)

    def _update(self, unit: Unit, states: list[torch.Tensor]) -> None:
        assert self.optimizer is not None
        update_buckets(unit.buckets, states, self.optimizer)

    def updates_inside_backward(self) -> bool:
        return True

    def before_backward(self, last_micro_batch: bool) -> None:
        if self.scheduler is not None:
            if last_micro_batch:
                self.lanes.start_step()
                if self.disk is not None:
                    self.disk.blocked_seconds = 0.0
            self.scheduler.begin_backward(update=last_micro_batch and self.optimizer is not None)

    def after_backward(self) -> None:
        if self.scheduler is not None:
            self.scheduler.end_backward()

    def phase_seconds(self) -> dict[str, float]:
        """Busy seconds of each copy direction and of the updates since the last step's backward began, and the
        seconds the host waited for the disk tier's reads and writes since then ('disk wait')."""
        phases = self.lanes.phase_seconds()
        if self.disk is not None:
            phases["disk wait"] = self.disk.blocked_seconds
        return phases

    def transfer_counters(self) -> dict[str, int]:
        if self.scheduler is None:
            return {}
        return {HOST_TO_DEVICE: self.lanes.copied_bytes[H2D], DEVICE_TO_HOST: self.lanes.copied_bytes[D2H]}

    def setup_inference(self, module: nn.Module, precision: str) -> nn.Module:
        return module

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: Path, client_state: dict[str, Any], *, weights_only: bool = False) -> None:
        if self.scheduler is None:  # its arenas are freed: what is left of its weights is stale
            raise RuntimeError(
                "Cannot save a checkpoint: this run's streaming engine was released when a later `fit` started in "
                "this process. Save checkpoints before starting the next run."
            )
        assert self._root is not None
        self.lanes.synchronize()
        # The hyperparameters an LR scheduler set live in the param groups: Lightning restores the scheduler only.
        optimizer = None if weights_only else self.optimizer
        groups = [{k: v for k, v in g.items() if k != "params"} for g in (optimizer.param_groups if optimizer else [])]
        stream_checkpoint.save(path, self.units, self.dtype, {**client_state, PARAM_GROUPS: groups},
                               persistent_buffers(self._root), disk=self.disk, weights_only=weights_only)

    def load_model_state_dict(self, module: nn.Module, state_dict: dict[str, Any], strict: bool) -> None:
        """validate / test / predict from another backend's checkpoint (or Lightning's file): each weight into the
        place the streaming plan keeps it."""
        assert self.scheduler is not None
        self.lanes.synchronize()
        targets = {name: param for unit in self.units for names, param in zip(unit.names, unit.params)
                   for name in names}
        copy_weights_by_name({**targets, **persistent_buffers(module)}, state_dict.items(), "The checkpoint", strict)
        self.scheduler.invalidate()

    def load_checkpoint(self, path: Path, *, load_optimizer_states: bool, strict: bool) -> dict[str, Any]:
        assert self.scheduler is not None and self._root is not None
        self.lanes.synchronize()
        client_state = stream_checkpoint.load(path, self.units, persistent_buffers(self._root),
                                              load_optimizer_states=load_optimizer_states, strict=strict,
                                              disk=self.disk)
        groups = client_state.pop(PARAM_GROUPS, [])
        if load_optimizer_states and self.optimizer is not None:
            for group, saved in zip(self.optimizer.param_groups, groups):
                group.update(saved)
        self.scheduler.invalidate()
        return client_state

    def teardown(self) -> None:
        if self.scheduler is not None:
            self.lanes.synchronize()
        if self.disk is not None:
            self.disk.flush()

    def _remove_hooks_and_disk(self) -> None:
        """Removes the update hooks and releases the disk tier's files and buffers."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self.disk is not None:
            self.disk.release()
            self.disk = None

    def release(self) -> None:
        """Frees the arenas and slots and removes the hooks; the module is unusable afterwards."""
        if self.scheduler is not None:  # no copy may still read or write an arena when it is unregistered
            self.lanes.synchronize()
        self._remove_hooks_and_disk()
        for arena in self._arenas:
            arena.release()
        self._arenas.clear()
        self._state_arena = self._gradient_arena = None
        self.scheduler = None
        self._root = None
        StreamBackend._live.forget(self)

    def describe(self) -> str:
        if self.placement is None:
            return (f"streaming plan ({self._precision}): blocks resident on {self._device} or streamed from pinned "
                    "host memory; 8-bit AdamW state in pinned host memory, updated on the device inside backward")
        blocks = sum(1 for u in self.units if u.is_block)
        resident = self.placement.resident_blocks([UnitSize(0, 0, u.is_block) for u in self.units])
        on_disk = (f", {len(self.placement.on_disk)} blocks' state ({self.placement.disk_bytes / GIB:.1f} GiB) in "
                   f"files under {self.config.nvme_path!r}" if self.placement.on_disk else "")
        summed = (f"; the streamed units' gradients summed in pinned host memory between micro-batches "
                  f"({self.placement.host_gradient_bytes / GIB:.1f} GiB)" if self.placement.host_gradient_bytes else "")
        return (f"streaming plan ({self._precision}): {resident} of {blocks} blocks resident on {self._device}, "
                f"{len(self.placement.streamed)} units streamed from pinned host memory; 8-bit AdamW state in pinned "
                f"host memory ({self.placement.host_pinned_bytes / GIB:.1f} GiB pinned){on_disk}, updated on "
                f"{self._device} inside backward{summed}")


def _gradient_ready(engine: weakref.ref[StreamBackend], unit: weakref.ref[Unit], _param: torch.Tensor) -> None:
    """A parameter's post-accumulate-grad hook. It holds the engine and the unit weakly: torch keeps it alive from
    C++, where garbage collection cannot see that they hold the parameter (and the whole run) in turn."""
    backend, ready = engine(), unit()
    if backend is not None and ready is not None:
        backend.scheduler.gradient_ready(ready)


def _state_bytes(params: list[nn.Parameter]) -> int:
    """Upper bound of a unit's 8-bit state: every parameter that requires a gradient is trained."""
    return sum(-(-p.numel() // BLOCK_SIZE) * RECORD_BYTES for p in params if p.requires_grad)


def _aligned_state(unit: Unit) -> int:
    return aligned(sum(entry.bucket.num_blocks * RECORD_BYTES for entry in unit.buckets))
