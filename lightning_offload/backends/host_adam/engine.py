"""The machinery of the `host_adam` backend: fp32 AdamW in host memory, stepped while backward still runs.

Parameters are laid out, in the order their gradients become final (the reverse of the order the module registers
them), in one flat host arena: fp32 master weights, exp_avg, exp_avg_sq. The flat space is cut into buckets of a
fixed size (a large parameter spans several). When the last parameter of a bucket has its gradient accumulated
(`register_post_accumulate_grad_hook`) the bucket is handed to one worker thread, which

1. copies the bucket's gradients to a pinned fp32 slot on a side stream (an event says when they landed) and frees
   them on the device,
2. steps the slot with torch's fused CPU AdamW, piece by piece, each piece cast to the device dtype into a pinned
   staging buffer right after its update (while it is still in cache) and copied back on another side stream (with
   `cast_on_device`, the fp32 piece crosses PCIe from the page-locked master weights and the GPU casts it: the host
   saves a pass over memory, the link carries 4 bytes per parameter instead of 2),
3. records an event after the bucket's last copy back and sets `host_done`.

A forward pre-hook on every module that owns parameters waits (host side for `host_done`, device side for the event)
only for that module's buckets, so the next forward starts as soon as its first layers' weights are back.

The parameters whose gradients become final last (the front of the model: the input embedding and the first
blocks, the tail of the engine's order) may keep their fp32 master and AdamW state on the device instead
(`device_state`): they are updated there as their gradients become final, on the compute stream, with torch's fused
AdamW. This is DeepSpeed's partial optimizer offload (ZeRO-Offload++ "Twin-Flow", `offload_optimizer.ratio`) laid
out along backward: the host steps the back blocks, whose gradients arrive first, while backward and the next
forward's front part run, and no host update is left for the layers the next forward needs first.

On a CPU "device" the same path runs with streams and events left out and copies done in place, so tests exercise
the same buckets, hooks and thread as a GPU run.

The worker is one thread because torch's fused AdamW already spreads each call over the intra-op thread pool (its
C++ kernel releases the GIL), and one thread keeps the updates in the order the next forward needs them.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_offload.backends.base import DEVICE_TO_HOST, HOST_TO_DEVICE

_FP32 = torch.float32
STAGING_SLOTS = 8


@dataclass(frozen=True)
class Slice:
    """A contiguous piece of one parameter (flattened) inside a bucket."""

    param: int
    offset: int
    """Where the piece starts inside the flattened parameter."""
    start: int
    """Where the piece starts in the arena's flat element space."""
    numel: int


class Bucket:
    def __init__(self, index: int, start: int, end: int, slices: list[Slice]) -> None:
        self.index, self.start, self.end, self.slices = index, start, end, slices
        self.params = sorted({piece.param for piece in slices})
        self.remaining = 0
        self.host_done = threading.Event()
        self.host_done.set()
        self.grads_final: Any = None
        """Device event: the bucket's gradients are complete on the compute stream."""
        self.weights_back: Any = None
        """Device event: the bucket's updated weights are on the device."""


@dataclass(frozen=True)
class Hyper:
    """One param group's hyperparameters, read when the update's backward starts (a scheduler's change made after
    `optimizer.step()` applies to the next update, never halfway through one)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    maximize: bool
    decoupled: bool


def layout(numels: Sequence[int], bucket_numel: int) -> list[Bucket]:
    """Buckets of `bucket_numel` elements over the parameters laid end to end (the last one may be shorter)."""
    buckets: list[Bucket] = []
    slices: list[Slice] = []
    position = bucket_start = 0
    for index, numel in enumerate(numels):
        offset = 0
        while offset < numel:
            take = min(bucket_start + bucket_numel - position, numel - offset)
            slices.append(Slice(index, offset, position, take))
            offset += take
            position += take
            if position - bucket_start == bucket_numel:
                buckets.append(Bucket(len(buckets), bucket_start, position, slices))
                slices, bucket_start = [], position
    if slices:
        buckets.append(Bucket(len(buckets), bucket_start, position, slices))
    return buckets


class HostAdamEngine:
    """Owns the host arena, the buckets, the hooks and the worker thread of one training run.

    Args:
        params: the optimizer's parameters, in the order their gradients become final in backward.
        groups: for each parameter, the index of its param group.
        device: where the weights live and the model computes.
        weight_dtype: the dtype of the device weights (bf16, or fp32 for `precision="32-true"`).
        masters: fp32 master values to start from, by parameter (a previous run's), instead of the device weights.
        device_state: how many of the last parameters (those whose gradients become final last) keep their master
            weights and AdamW state on the device and are updated there, inside backward.
    """

    def __init__(self, params: list[torch.nn.Parameter], groups: list[int], device: torch.device,
                 weight_dtype: torch.dtype, *, bucket_numel: int, chunk_numel: int, grad_slots: int,
                 pin_memory: bool, host_threads: int | None,
                 masters: dict[torch.nn.Parameter, torch.Tensor] | None = None, device_state: int = 0,
                 cast_on_device: bool = False) -> None:
        self.params, self.groups, self.device, self.weight_dtype = params, groups, device, weight_dtype
        self.cuda = device.type == "cuda"
        self.cast_on_device = cast_on_device and self.cuda
        self.chunk_numel, self.host_threads = chunk_numel, host_threads
        # Device updates go by larger pieces (fewer launches); each piece's fp32 gradient is a temporary.
        self.device_chunk_numel = bucket_numel
        self.numels = [p.numel() for p in params]
        self.host_count = len(params) - device_state
        """Parameters stepped on the host: the first ones in the engine's order; the rest are updated on the device."""
        host_numels, device_numels = self.numels[:self.host_count], self.numels[self.host_count:]
        # Offsets into each parameter's own arena: the host arena, or the device arena for the last ones.
        self.offsets = [*[0, *itertools.accumulate(host_numels)][:-1], *[0, *itertools.accumulate(device_numels)][:-1]]
        self.total = sum(host_numels)
        self.device_total = sum(device_numels)
        self.buckets = layout(host_numels, bucket_numel)
        self.param_buckets: list[list[Bucket]] = [[] for _ in params]
        for bucket in self.buckets:
            for index in bucket.params:
                self.param_buckets[index].append(bucket)
        self.steps = [0] * len(params)
        self.pinned = pin_memory and self.cuda
        self.arena = self._build_arena(masters or {})
        self.master, self.exp_avg, self.exp_avg_sq = self.arena.view(3, self.total).unbind(0)
        self.device_arena = self._build_device_arena(masters or {})
        self.device_master, self.device_exp_avg, self.device_exp_avg_sq = \
            self.device_arena.view(3, self.device_total).unbind(0)
        slot_numel = min(bucket_numel, self.total)
        self._free_slots: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
        for _ in range(grad_slots):
            self._free_slots.put(torch.empty(slot_numel, dtype=_FP32, pin_memory=self.pinned))
        self._master_registered = False
        if self.cast_on_device and self.pinned and self.total:
            # Weights leave as fp32 straight from the master weights, so those (4 of the arena's 12 bytes per
            # parameter) are page-locked, in one call over pages already touched (the fast way to page-lock).
            torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(self.master.data_ptr(), 4 * self.total, 0))
            self._master_registered = True
        self._staging = deque((self._staging_buffer(min(chunk_numel, self.total)), None)
                              for _ in range(STAGING_SLOTS))
        self._d2h = torch.cuda.Stream(device) if self.cuda else None
        self._h2d = torch.cuda.Stream(device) if self.cuda else None
        self.hyper: list[Hyper] = []
        self.clip: tuple[str, float] | None = None
        self.timeline: list[tuple[str, int, float]] | None = None
        """Set to a list to record (what, bucket, time.perf_counter()) of every bucket's host work (tests, traces)."""
        self.copied_bytes = {HOST_TO_DEVICE: 0, DEVICE_TO_HOST: 0}
        """Bytes of gradients copied out and of updated weights copied back (the backend's `transfer_counters`)."""
        self.released = False
        self._armed = False
        self._final = [True] * len(params)
        self._has_grad = [False] * len(params)
        self._grads: list[torch.Tensor | None] = [None] * len(params)
        self._copies_left = [0] * len(params)
        self._held: list[Bucket] = []
        self._held_on_device: list[int] = []
        self._norms: list[torch.Tensor] = []
        self._clip_coef: torch.Tensor | None = None
        self._error: BaseException | None = None
        self._queue: queue.SimpleQueue[Bucket | None] = queue.SimpleQueue()
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook(index)) for index, p in enumerate(params)]
        self._worker = threading.Thread(target=self._run, name="host-adam", daemon=True)
        self._worker.start()

    # --- building ----------------------------------------------------------------------------------------------

    def _build_arena(self, masters: dict[torch.nn.Parameter, torch.Tensor]) -> torch.Tensor:
        # Allocated untouched and filled one parameter at a time while each source weight is replaced: host memory
        # never holds the model twice. The arena stays pageable: no copy to or from the device starts or ends in it
        # (gradients land in the pinned slots, weights leave from the pinned staging buffers or, with
        # `cast_on_device`, from the master weights alone), so page-locking all 12 bytes per parameter (seconds)
        # would buy nothing.
        arena = torch.empty(3 * self.total, dtype=_FP32)
        self._fill(arena, range(self.host_count), masters)
        arena[self.total:].zero_()
        return arena

    def _build_device_arena(self, masters: dict[torch.nn.Parameter, torch.Tensor]) -> torch.Tensor:
        arena = torch.empty(3 * self.device_total, dtype=_FP32, device=self.device)
        self._fill(arena, range(self.host_count, len(self.params)), masters)
        arena[self.device_total:].zero_()
        return arena

    def _staging_buffer(self, numel: int) -> torch.Tensor:
        if self.cast_on_device:
            return torch.empty(numel, dtype=_FP32, device=self.device)  # fp32 lands here, cast into the weights
        return torch.empty(numel, dtype=self.weight_dtype, pin_memory=self.pinned)

    def _fill(self, arena: torch.Tensor, indices: range, masters: dict[torch.nn.Parameter, torch.Tensor]) -> None:
        for index in indices:
            param = self.params[index]
            if param.is_meta:
                raise ValueError(
                    "The `host_adam` backend builds fp32 master weights from the module's weights, but "
                    f"parameter {index} is on the meta device. Materialise the model (build it in `configure_model`, "
                    "which the strategy places on the training device) before `fit`."
                )
            source = masters.get(param, param.detach())
            view = arena[self.offsets[index]:self.offsets[index] + self.numels[index]]
            view.copy_(source.reshape(-1))
            param.data = self._device_weight(view.view(param.shape), param.detach())

    def _device_weight(self, master: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        if current.device == self.device and current.dtype == self.weight_dtype:
            return current
        if current.device == self.device:
            return current.to(self.weight_dtype)  # cast where the weight is (the GPU), not through the host
        return torch.empty(master.shape, dtype=self.weight_dtype, device=self.device).copy_(master)

    def refresh_device_weights(self) -> None:
        """Copies every master weight to the device (after loading a checkpoint)."""
        self.wait_all()
        for index, param in enumerate(self.params):
            param.data.copy_(self.master_of(index))

    # --- the step, seen from the training loop ----------------------------------------------------------------

    def arm(self, hyper: list[Hyper], clip: tuple[str, float] | None) -> None:
        """The next backward produces the final gradients: update each bucket as soon as its gradients are final."""
        self.wait(self.buckets)
        self.hyper, self.clip = hyper, clip
        self._held, self._held_on_device, self._norms, self._clip_coef = [], [], [], None
        for bucket in self.buckets:
            bucket.remaining = len(bucket.params)
            bucket.host_done.clear()
        self._final = [False] * len(self.params)
        self._copies_left = [len(buckets) for buckets in self.param_buckets]
        self._armed = True

    def disarm(self) -> None:
        self._armed = False

    def finish_backward(self) -> None:
        """After the armed backward: parameters it did not reach are not updated (like torch's AdamW, which skips
        parameters without a gradient); with clipping by norm, the held buckets go now, scaled, and the parameters
        updated on the device follow, on the compute stream."""
        if not self._armed:
            return
        for index in range(len(self.params)):
            if not self._final[index]:
                self._mark_final(index)
        if self.clip is not None and self.clip[0] == "norm":
            self._release_held()
            for index in self._held_on_device:
                self._update_on_device(index)
        self._armed = False

    def wait(self, buckets: Sequence[Bucket]) -> None:
        """Blocks until these buckets' weights are updated; on a GPU, the current stream waits for them to land."""
        if self._armed:
            # Recomputation inside the updating backward (activation checkpointing): `arm` found every bucket
            # updated, and this micro-batch's forward already waited for the copies; the buckets being updated now
            # belong to layers whose backward is done.
            return
        for bucket in buckets:
            if not bucket.host_done.is_set():
                bucket.host_done.wait()
            self.raise_if_failed()
            if self.cuda and bucket.weights_back is not None:
                torch.cuda.current_stream(self.device).wait_event(bucket.weights_back)

    def wait_all(self) -> None:
        self.wait(self.buckets)
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()

    def wait_in_forward(self, module: torch.nn.Module) -> None:
        """Every submodule that owns parameters waits for their buckets before it runs (forward, and recompute)."""
        position = {param: index for index, param in enumerate(self.params)}
        for submodule in module.modules():
            buckets = {bucket.index: bucket for p in submodule.parameters(recurse=False) if p in position
                       for bucket in self.param_buckets[position[p]]}
            if buckets:
                waits = [buckets[index] for index in sorted(buckets)]
                self._hooks.append(submodule.register_forward_pre_hook(lambda _m, _a, waits=waits: self.wait(waits)))

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError("The `host_adam` optimizer thread failed; see the error above.") from self._error

    @property
    def failed(self) -> bool:
        return self._error is not None

    def close(self) -> None:
        """Stops the worker and removes the hooks (the engine cannot step afterwards; its state stays readable)."""
        # The garbage collector may release an engine on its own worker thread, which cannot wait for itself.
        on_worker = threading.current_thread() is self._worker
        if not self.failed and not on_worker:  # a failed worker has stopped, its error raised in the run it broke
            self.wait_all()
        self._queue.put(None)
        if not on_worker:
            self._worker.join()
        for handle in self._hooks:
            handle.remove()

    def release(self) -> None:
        """Closes the engine and frees its host memory (a later fit's engine has taken over)."""
        self.close()
        if self._master_registered:  # `close` waited for every copy out of it
            torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(self.master.data_ptr()))
            self._master_registered = False
        self.released = True
        self.arena = self.master = self.exp_avg = self.exp_avg_sq = torch.empty(0)
        self.device_arena = self.device_master = self.device_exp_avg = self.device_exp_avg_sq = torch.empty(0)
        self._staging.clear()

    # --- inside backward (autograd's thread) ------------------------------------------------------------------

    def _hook(self, index: int) -> Any:
        def gradient_final(param: torch.Tensor) -> None:
            if self._armed:
                self._mark_final(index)

        return gradient_final

    def _mark_final(self, index: int) -> None:
        # The engine takes the gradient: nothing after this point (Lightning's own clipping, a later zero_grad)
        # can change it while it waits for its copy.
        param = self.params[index]
        self._final[index] = True
        self._grads[index], param.grad = param.grad, None
        self._has_grad[index] = self._grads[index] is not None
        if self._has_grad[index]:
            self.steps[index] += 1
        if self.on_device(index):
            self._device_gradient_final(index)
            return
        for bucket in self.param_buckets[index]:
            bucket.remaining -= 1
            if bucket.remaining == 0:
                self._bucket_final(bucket)

    def _bucket_final(self, bucket: Bucket) -> None:
        if self.cuda:
            bucket.grads_final = torch.cuda.Event()
            bucket.grads_final.record(torch.cuda.current_stream(self.device))
        if self.clip is not None and self.clip[0] == "norm":
            # The global norm needs every gradient: the bucket waits on the device, its norm computed now.
            self._norms.append(sum(
                (self._grad_piece(piece).float().square().sum() for piece in bucket.slices
                 if self._has_grad[piece.param]),
                torch.zeros((), device=self.device),
            ))
            self._held.append(bucket)
            return
        self._queue.put(bucket)

    def _device_gradient_final(self, index: int) -> None:
        if not self._has_grad[index]:
            return
        if self.clip is not None and self.clip[0] == "norm":
            # Held until the global norm is known (`finish_backward`); its square counts towards it now.
            self._norms.append(self._grads[index].float().square().sum())
            self._held_on_device.append(index)
            return
        self._update_on_device(index)

    def _update_on_device(self, index: int) -> None:
        """Steps one parameter whose state is on the device, on the current (compute) stream, with the same fused
        AdamW and the same clipping as the host path, then casts the new master into the device weight."""
        grad, self._grads[index] = self._grads[index].view(-1), None
        hyper = self.hyper[self.groups[index]]
        step = torch.full((), float(self.steps[index]), dtype=_FP32, device=self.device)
        start, weight = self.offsets[index], self.params[index].data.view(-1)
        for low in range(0, self.numels[index], self.device_chunk_numel):
            high = min(low + self.device_chunk_numel, self.numels[index])
            piece = self._clipped(grad[low:high].float())
            master = self.device_master[start + low:start + high]
            _adam_step(master, piece, self.device_exp_avg[start + low:start + high],
                       self.device_exp_avg_sq[start + low:start + high], step, hyper)
            weight[low:high].copy_(master)

    def _clipped(self, grad: torch.Tensor) -> torch.Tensor:
        """An fp32 gradient with the step's clipping applied (by the norm's coefficient, or by value)."""
        if self.clip is None:
            return grad
        if self.clip[0] == "norm":
            return grad.mul(self._clip_coef)
        return grad.clamp(-self.clip[1], self.clip[1])

    def _release_held(self) -> None:
        # torch.nn.utils.clip_grad_norm_'s coefficient, kept on the device: no synchronisation.
        total = torch.stack(self._norms).sum().sqrt() if self._norms else torch.zeros((), device=self.device)
        self._clip_coef = (self.clip[1] / (total + 1e-6)).clamp(max=1.0)
        event = torch.cuda.Event() if self.cuda else None
        if event is not None:
            event.record(torch.cuda.current_stream(self.device))
        for bucket in self._held:
            bucket.grads_final = event
            self._queue.put(bucket)

    def _grad_piece(self, piece: Slice) -> torch.Tensor:
        grad = self._grads[piece.param]
        return grad.view(-1)[piece.offset:piece.offset + piece.numel]

    # --- the worker thread --------------------------------------------------------------------------------------

    def _run(self) -> None:
        if self.cuda:
            torch.cuda.set_device(self.device)
        if self.host_threads:
            torch.set_num_threads(self.host_threads)
        ready: deque[Bucket] = deque()
        landed: deque[tuple[Bucket, torch.Tensor, Any]] = deque()
        try:
            while True:
                if not ready and not landed:
                    item = self._queue.get()
                    if item is None:
                        return
                    ready.append(item)
                while True:  # take what else backward has finished, without waiting
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        return
                    ready.append(item)
                # Copy ahead while slots are free, so the next bucket's gradients cross PCIe during this update.
                while ready and not self._free_slots.empty():  # every slot is free while nothing has landed
                    bucket = ready.popleft()
                    slot = self._free_slots.get()
                    landed.append((bucket, slot, self._copy_out(bucket, slot)))
                if landed:
                    self._update(*landed.popleft())
        except BaseException as error:  # noqa: BLE001 - handed to the training thread, which raises it
            self._error = error
            for bucket in self.buckets:
                bucket.host_done.set()

    def _note(self, what: str, bucket: Bucket) -> None:
        if self.timeline is not None:
            self.timeline.append((what, bucket.index, time.perf_counter()))

    def _copy_out(self, bucket: Bucket, slot: torch.Tensor) -> Any:
        """Gradients of the bucket into `slot` as fp32; returns the event marking them landed (None on a CPU).

        fp32 crosses PCIe rather than bf16: the host's memory bandwidth bounds the step, and a bf16 copy would need
        a host pass reading 2 and writing 4 more bytes per parameter, while PCIe has room to spare during backward.
        """
        self._note("copy", bucket)
        stream = torch.cuda.stream(self._d2h) if self.cuda else _no_stream()
        with stream:
            if self.cuda:
                self._d2h.wait_event(bucket.grads_final)
            for piece in bucket.slices:
                if not self._has_grad[piece.param]:
                    continue
                grad = self._grad_piece(piece)
                if self.clip is not None:
                    grad = self._clipped(grad.float())
                slot[piece.start - bucket.start:piece.start - bucket.start + piece.numel].copy_(grad, non_blocking=True)
                self.copied_bytes[DEVICE_TO_HOST] += piece.numel * slot.element_size()
            event = None
            if self.cuda:
                event = torch.cuda.Event()
                event.record(self._d2h)
        for piece in bucket.slices:
            self._copies_left[piece.param] -= 1
            grad = self._grads[piece.param]
            if self._copies_left[piece.param] == 0 and grad is not None:
                if self.cuda:
                    grad.record_stream(self._d2h)  # freed on the device once the copy has run
                self._grads[piece.param] = None
        return event

    def _update(self, bucket: Bucket, slot: torch.Tensor, landed: Any) -> None:
        if landed is not None:
            landed.synchronize()
        self._note("update", bucket)
        for start, end, hyper, step in self._runs(bucket):
            step_tensor = torch.tensor(float(step))
            for piece_start in range(start, end, self.chunk_numel):
                piece_end = min(piece_start + self.chunk_numel, end)
                grad = slot[piece_start - bucket.start:piece_end - bucket.start]
                _adam_step(self.master[piece_start:piece_end], grad, self.exp_avg[piece_start:piece_end],
                           self.exp_avg_sq[piece_start:piece_end], step_tensor, hyper)
                self._send_back(bucket, piece_start, piece_end)
        self._free_slots.put(slot)
        if self.cuda:
            bucket.weights_back = torch.cuda.Event()
            bucket.weights_back.record(self._h2d)
        self._note("done", bucket)
        bucket.host_done.set()

    def _runs(self, bucket: Bucket) -> list[tuple[int, int, Hyper, int]]:
        """Flat ranges of the bucket that one fused call can step: same param group, same step count, gradient."""
        runs: list[tuple[int, int, Hyper, int]] = []
        for piece in bucket.slices:
            if not self._has_grad[piece.param]:
                continue
            hyper, step = self.hyper[self.groups[piece.param]], self.steps[piece.param]
            if runs and runs[-1][1] == piece.start and runs[-1][2] is hyper and runs[-1][3] == step:
                runs[-1] = (runs[-1][0], piece.start + piece.numel, hyper, step)
            else:
                runs.append((piece.start, piece.start + piece.numel, hyper, step))
        return runs

    def _send_back(self, bucket: Bucket, start: int, end: int) -> None:
        staging, previous_use = self._staging.popleft()
        if previous_use is not None:
            previous_use.synchronize()
        if not self.cast_on_device:
            staging[:end - start].copy_(self.master[start:end])  # the cast, while the piece is still in cache
        stream = torch.cuda.stream(self._h2d) if self.cuda else _no_stream()
        with stream:
            if self.cast_on_device:
                # The next write to this piece of the master is its next update, which waits for gradients that
                # come after a forward that waited for this copy: no host wait is needed before it.
                staging[:end - start].copy_(self.master[start:end], non_blocking=True)
            for piece in bucket.slices:
                low, high = max(start, piece.start), min(end, piece.start + piece.numel)
                if low >= high:
                    continue
                weight = self.params[piece.param].detach().view(-1)
                offset = piece.offset + low - piece.start
                weight[offset:offset + high - low].copy_(staging[low - start:high - start], non_blocking=True)
            used = None
            if self.cuda and not self.cast_on_device:  # a device buffer is reused in the h2d stream's order
                used = torch.cuda.Event()
                used.record(self._h2d)
        self._staging.append((staging, used))
        self.copied_bytes[HOST_TO_DEVICE] += (end - start) * staging.element_size()

    # --- state ---------------------------------------------------------------------------------------------------

    def on_device(self, index: int) -> bool:
        """Whether this parameter's master weights and AdamW state live on the device."""
        return index >= self.host_count

    def master_of(self, index: int) -> torch.Tensor:
        master = self.device_master if self.on_device(index) else self.master
        start = self.offsets[index]
        return master[start:start + self.numels[index]].view(self.params[index].shape)

    def state_of(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        exp_avg, exp_avg_sq = (self.device_exp_avg, self.device_exp_avg_sq) if self.on_device(index) \
            else (self.exp_avg, self.exp_avg_sq)
        start, shape = self.offsets[index], self.params[index].shape
        end = start + self.numels[index]
        return exp_avg[start:end].view(shape), exp_avg_sq[start:end].view(shape)


class _no_stream:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _adam_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               step: torch.Tensor, hyper: Hyper) -> None:
    """One fused Adam/AdamW update, in place.

    torch's fused CPU kernel rather than DeepSpeed's CPU Adam: both are vectorised and bound by host memory
    bandwidth (equally fast), both release the GIL, but torch's needs no
    JIT build (a known failure point on users' machines), has Adam's L2 weight decay and `maximize`, and is the
    exact kernel `torch.optim.AdamW(fused=True)` runs, so results match the user's optimizer bit for bit.
    """
    update = torch._fused_adamw_ if hyper.decoupled else torch._fused_adam_
    update([param], [grad], [exp_avg], [exp_avg_sq], [], [step], lr=hyper.lr, beta1=hyper.beta1, beta2=hyper.beta2,
           weight_decay=hyper.weight_decay, eps=hyper.eps, amsgrad=False, maximize=hyper.maximize)

