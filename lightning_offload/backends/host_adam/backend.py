"""Exact fp32 AdamW in host memory, stepped during backward; bf16 weights stay on the GPU.

The plan for models whose bf16 weights and activations fit on the GPU but whose fp32 master weights and AdamW state
(12 bytes per parameter) do not. Each bucket of gradients leaves the GPU as soon as backward has finished it, and
torch's fused CPU AdamW steps it on a worker thread while backward goes on; the new weights come back on a side
stream and the next forward waits only for the buckets it is about to use (`engine.py` has the
mechanics). Gradients accumulate on the GPU; the update happens inside the last micro-batch's backward.

The front of the model (input embedding, first blocks) finishes its gradients last in backward and is needed first
by the next forward: with `gpu_state_blocks=k`, its optimizer state stays on the GPU (12 bytes per parameter) and
is updated there inside backward, so no host update is left for it when backward ends (DeepSpeed calls this split
of the optimizer between GPU and CPU "Twin-Flow", `offload_optimizer.ratio`).

torchao's `CPUOffloadOptimizer` fills a similar role but steps only after backward ends and cannot accumulate with
offloaded gradients; DeepSpeed's ZeRO offload steps after backward too. This backend exists for that overlap.
"""

from __future__ import annotations

import warnings
import weakref
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from lightning_offload.backends.base import Backend, BackendConfig, LastEngine, TrainingSetup
from lightning_offload.backends.host_adam.checkpoint import (
    CHECKPOINT_FILE,
    FORMAT,
    MASTERS,
    load_buffers,
    load_weights,
    parameter_names,
    persistent_buffers,
    read_checkpoint,
    saved_parameters,
)
from lightning_offload.backends.host_adam.engine import STAGING_SLOTS, HostAdamEngine, Hyper
from lightning_offload.activation_checkpointing import find_blocks
from lightning_offload.compile import refuse_compiled_submodules
from lightning_offload.norm_statistics import match_norm_weights_to_statistics
from lightning_offload.optim import decouples_weight_decay, is_adam
from lightning_offload.planner.budget import refuse_beyond_host_room
from lightning_offload.saving import atomic_directory, write_state_dict

_WEIGHT_DTYPES = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "32-true": torch.float32}
# Flags of torch's Adam/AdamW that choose an implementation; the host step has its own.
_IMPLEMENTATION_FLAGS = frozenset({"foreach", "fused", "capturable", "differentiable"})


@dataclass(kw_only=True)
class HostAdamConfig(BackendConfig):
    bucket_numel: int = 16_000_000
    """Parameters per bucket. Smaller buckets start host updates earlier in backward and shorten the tail after it;
    each costs a few device events and Python calls. Pinned host memory holds `grad_slots` of them (4 B each)."""
    chunk_numel: int = 2_000_000
    """Parameters per fused AdamW call: each piece is cast and sent back while still in the CPU's cache."""
    grad_slots: int = 3
    """Pinned fp32 gradient buffers of one bucket each: while one bucket is stepped, the next ones cross PCIe."""
    pin_memory: bool = True
    """Page-locked gradient slots and weight staging buffers (PCIe copies ~6x faster); ignored without a GPU."""
    host_threads: int | None = None
    """Intra-op threads of the host AdamW; None: all cores but one on a GPU machine (one drives the GPU)."""
    cast_on_device: bool = True
    """Send updated weights back as fp32 from the page-locked master weights and cast them on the GPU, instead of
    casting each piece on the host into a staging buffer: one pass over host memory less per update, twice the
    bytes on the host-to-device link (idle during backward otherwise). Page-locks 4 bytes per parameter at setup.
    False suits a link much slower than the host's memory."""
    gpu_state_blocks: int | None = None
    """Blocks at the front of the model (with the parameters before them, e.g. the input embedding) whose fp32
    master weights and AdamW state stay on the GPU (12 bytes per parameter there, 12 fewer in host memory), updated
    there inside backward. Their gradients are the last to become final, so the host work left when backward ends
    shrinks as this grows. None: the planner's choice (the most that fit; everything on the host when no plan ran,
    e.g. with `check_memory=False`); 0: every parameter's state in host memory."""

    def __post_init__(self) -> None:
        for name in ("bucket_numel", "chunk_numel", "grad_slots"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}={getattr(self, name)}` must be a positive integer.")
        if self.gpu_state_blocks is not None and self.gpu_state_blocks < 0:
            raise ValueError(
                f"`gpu_state_blocks={self.gpu_state_blocks}` must be a block count from 0 (everything in host memory) "
                "up to the model's number of blocks, or None to let the planner choose."
            )


class HostAdamW(Optimizer):
    """The optimizer Lightning and LR schedulers see: a real `torch.optim.Optimizer` with the user's param groups.

    It subclasses `Optimizer` because schedulers and Lightning check the type. Its `step(closure)` runs the closure
    (forward and backward, during which the backend updates the weights) and returns at once: the next forward
    waits, bucket by bucket, for the weights it uses. Hyperparameters are read from `param_groups` when the
    update's backward starts, so a scheduler's change after `step()` applies to the next update.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        _refuse_unsupported(optimizer)
        self.decoupled = decouples_weight_decay(optimizer)
        groups = [{k: v for k, v in g.items() if k not in _IMPLEMENTATION_FLAGS} for g in optimizer.param_groups]
        defaults = {k: v for k, v in optimizer.defaults.items() if k not in _IMPLEMENTATION_FLAGS}
        super().__init__(groups, defaults)
        self.engine: HostAdamEngine | None = None
        # Whether `step` returns only once every weight is updated (a callback reads them all after the step).
        self.wait_after_step = False

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.engine is not None:
            if self.wait_after_step:
                self.engine.wait_all()
            self.engine.raise_if_failed()
        return loss

    def hyperparameters(self) -> list[Hyper]:
        return [
            Hyper(lr=float(g["lr"]), beta1=float(g["betas"][0]), beta2=float(g["betas"][1]), eps=float(g["eps"]),
                  weight_decay=float(g["weight_decay"]), maximize=bool(g.get("maximize", False)),
                  decoupled=self.decoupled)
            for g in self.param_groups
        ]

    def state_dict(self) -> dict[str, Any]:
        """torch's Adam/AdamW format (views of the engine's state on the host or the GPU, not copies), loadable by
        `torch.optim.AdamW`."""
        groups, index_of = [], {}
        for group in self.param_groups:
            indices = []
            for param in group["params"]:
                index_of.setdefault(param, len(index_of))
                indices.append(index_of[param])
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": indices})
        state: dict[int, Any] = {}
        if self.engine is not None:
            self.engine.wait_all()
            for position, param in enumerate(self.engine.params):
                if self.engine.steps[position]:
                    exp_avg, exp_avg_sq = self.engine.state_of(position)
                    state[index_of[param]] = {"step": torch.tensor(float(self.engine.steps[position])),
                                              "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        params = [p for group in self.param_groups for p in group["params"]]
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        if self.engine is None:
            return
        self.engine.wait_all()
        position = {param: index for index, param in enumerate(self.engine.params)}
        for index, saved in state_dict["state"].items():
            here = position[params[int(index)]]
            exp_avg, exp_avg_sq = self.engine.state_of(here)
            exp_avg.copy_(saved["exp_avg"])
            exp_avg_sq.copy_(saved["exp_avg_sq"])
            self.engine.steps[here] = int(saved["step"])


def _refuse_unsupported(optimizer: Optimizer) -> None:
    if not is_adam(optimizer, exact=True):
        raise ValueError(
            f"The `host_adam` backend steps exact Adam/AdamW on the host, but `configure_optimizers` returned "
            f"`{type(optimizer).__name__}`. Return `torch.optim.AdamW` (or `Adam`), or pick a backend that runs any "
            "optimizer: `backend='device'` (no offload) or `backend='deepspeed'` (ZeRO-3 offload)."
        )
    if any(group.get("amsgrad") for group in optimizer.param_groups):
        raise ValueError(
            f"`{type(optimizer).__name__}(amsgrad=True)` needs a third state tensor the `host_adam` backend does not "
            "keep. Drop `amsgrad=True`, or use `backend='device'` or `backend='deepspeed'`."
        )


class HostAdamBackend(Backend):
    name = "host_adam"
    Config = HostAdamConfig
    saves_own_state = True
    manual_optimization_refusal = "it updates each parameter on the host during backward, not at `opt.step()`."
    gradient_hooks_refusal = "moves each parameter's gradient to the host, and updates it there, during backward."
    precisions = tuple(_WEIGHT_DTYPES)
    precision_advice = (". Use 'bf16-mixed' or 'bf16-true' (bf16 weights on the device, fp32 master weights on the "
                        "host) or '32-true' (fp32 weights on both)")

    # The next engine built in this process starts from this one's master weights.
    _live: ClassVar[LastEngine[HostAdamEngine]] = LastEngine()

    def __init__(self, config: HostAdamConfig) -> None:
        super().__init__(config)
        self.config: HostAdamConfig = config
        self._device = torch.device("cpu")
        self._precision = "32-true"
        self._optimizer: HostAdamW | None = None
        self._module: torch.nn.Module | None = None
        self._clip: tuple[str, float] | None = None

    @property
    def engine(self) -> HostAdamEngine | None:
        return self._optimizer.engine if self._optimizer is not None else None

    def transfer_counters(self) -> dict[str, int]:
        return dict(self.engine.copied_bytes) if self.engine is not None else {}

    def setup_environment(self, device: torch.device) -> None:
        self._device = device

    @property
    def gpu_state_blocks(self) -> int:
        """The configured share, else the planner's (0 when no plan ran)."""
        return self.configured_or_planned("gpu_state_blocks", 0)

    def precision_plugin(self, plugins: ModuleType, precision: str, trainer_plugin: Any) -> Any:
        # The engine clips gradients itself, on their way to the host (`Trainer(gradient_clip_val=...)` is read at
        # setup); by the time Lightning would clip, the gradients have left the parameters.
        trainer_plugin.clip_gradients = lambda *args, **kwargs: None
        return trainer_plugin

    def model_init_context(self) -> AbstractContextManager:
        # Built where it trains: the fp32 model never exists in host memory, and each weight is cast on the GPU.
        return torch.device(self._device) if self._device.type == "cuda" else nullcontext()

    def optimizer_state_device(self, device: torch.device) -> torch.device:
        return torch.device("cpu")

    def prepare_module(self, module: torch.nn.Module) -> torch.nn.Module:
        refuse_compiled_submodules(module, self.name, "waits for each layer's update before it runs")
        return module

    def prepare_optimizer(self, optimizer: Optimizer) -> Optimizer:
        self._optimizer = HostAdamW(optimizer)
        return self._optimizer

    def setup_training(
        self, module: torch.nn.Module, optimizer: Optimizer, setup: TrainingSetup
    ) -> tuple[torch.nn.Module, Optimizer]:
        assert optimizer is self._optimizer, "`prepare_optimizer` builds the optimizer this backend steps"
        self._clip = _clipping(setup)
        # The next forward waits for the weights it uses; weight averaging reads them all after the step.
        self._optimizer.wait_after_step = setup.weights_read_after_step
        weight_dtype = _WEIGHT_DTYPES[self._precision]
        in_optimizer = {p for group in optimizer.param_groups for p in group["params"]}
        group_of = {p: index for index, group in enumerate(optimizer.param_groups) for p in group["params"]}
        # Gradients become final in roughly the reverse of the order modules register their parameters.
        ordered = [p for p in reversed(list(module.parameters())) if p in in_optimizer]
        frozen = [name for name, p in module.named_parameters() if p in in_optimizer and not p.requires_grad]
        if frozen:
            raise ValueError(
                f"{len(frozen)} parameter(s) given to the optimizer do not require gradients (e.g. {frozen[0]!r}); the "
                "`host_adam` backend steps every parameter it is given during backward. Give the optimizer only the "
                "trainable ones: `AdamW([p for p in self.parameters() if p.requires_grad], ...)`."
            )
        missing = len(in_optimizer) - len(ordered)
        if missing:
            raise ValueError(
                f"{missing} parameter(s) of the optimizer do not belong to the LightningModule. The `host_adam` "
                "backend keeps master weights of the module's own parameters: optimize `self.parameters()`."
            )
        # A second fit of the same module starts from the previous run's fp32 master weights, not from their bf16
        # cast; the previous engine is released once they are copied (its checkpoints must be saved before).
        previous = HostAdamBackend._live.take()
        masters = {}
        if previous is not None:
            previous.close()
            if not previous.failed:  # a failed run's master weights may be half updated
                masters = {p: previous.master_of(i) for i, p in enumerate(previous.params) if p in in_optimizer}
        threads = self.config.host_threads
        if threads is None and self._device.type == "cuda":
            threads = max(1, torch.get_num_threads() - 1)
        front = self._front_parameters(module)
        self._refuse_beyond_host_room([p for p in ordered if p not in front], weight_dtype)
        engine = HostAdamEngine(
            ordered, [group_of[p] for p in ordered], self._device, weight_dtype,
            bucket_numel=self.config.bucket_numel, chunk_numel=self.config.chunk_numel,
            grad_slots=self.config.grad_slots, pin_memory=self.config.pin_memory, host_threads=threads,
            masters=masters, device_state=sum(p in front for p in ordered),
            cast_on_device=self.config.cast_on_device,
        )
        del masters
        if previous is not None:
            previous.release()
        for param in module.parameters():  # frozen parameters and those the optimizer does not hold
            if param not in in_optimizer:
                param.data = param.data.to(self._device, weight_dtype if param.is_floating_point() else None)
        match_norm_weights_to_statistics(module)
        HostAdamBackend._live.keep(engine)
        # Kept for the next fit of this module; once the module is gone (the user dropped it and its Trainer), no fit
        # can take its master weights over, and its host memory is freed.
        weakref.finalize(module, _release_with_module, engine).atexit = False  # the process frees it at exit
        self._optimizer.engine = engine
        self._module = module
        engine.wait_in_forward(module)
        return module, self._optimizer

    def _refuse_beyond_host_room(self, host_params: list[torch.nn.Parameter], weight_dtype: torch.dtype) -> None:
        """Refuses, before the engine allocates it, host memory the run may not use: the arena (fp32 master weights
        and both AdamW moments, 12 bytes per parameter stepped on the host), the pinned gradient slots and, when
        weights are cast on the host, the pinned staging buffers."""
        numel = sum(p.numel() for p in host_params)
        slots = self.config.grad_slots * min(self.config.bucket_numel, numel) * 4
        casts_on_host = not (self.config.cast_on_device and self._device.type == "cuda")
        staging = STAGING_SLOTS * min(self.config.chunk_numel, numel) * weight_dtype.itemsize if casts_on_host else 0
        refuse_beyond_host_room(
            12 * numel + slots + staging, self.host_memory_available(),
            what=f"The `host_adam` backend's optimizer state of {numel:,} parameters and its pinned buffers",
            fix="Keep more blocks' optimizer state on the GPU (`gpu_state_blocks`), or let `backend='auto'` choose a "
                "plan with less host memory.",
        )

    def _front_parameters(self, module: torch.nn.Module) -> set[torch.nn.Parameter]:
        """The parameters whose optimizer state stays on the device: the first `gpu_state_blocks` blocks and every
        parameter registered before the last of them (the input embedding), i.e. a tail of the engine's order."""
        blocks, count = find_blocks(module), self.gpu_state_blocks
        if count > len(blocks):
            raise ValueError(
                f"`gpu_state_blocks={count}` but {type(module).__name__} has {len(blocks)} repeated blocks. Pass a "
                f"number from 0 to {len(blocks)}, or None to let the planner choose."
            )
        if count == 0:
            return set()
        last = {id(p) for p in blocks[count - 1].parameters()}
        parameters = list(module.parameters())
        end = max(index for index, p in enumerate(parameters) if id(p) in last)
        return set(parameters[:end + 1])

    def setup_inference(self, module: torch.nn.Module, precision: str) -> torch.nn.Module:
        if self.engine is not None:
            self.engine.wait_all()
        self._module = module
        return module.to(self._device)

    def updates_inside_backward(self) -> bool:
        return True

    def before_backward(self, last_micro_batch: bool) -> None:
        engine = self.engine
        if engine is None:
            return
        if last_micro_batch:
            engine.arm(self._optimizer.hyperparameters(), self._clip)
        else:
            engine.disarm()

    def after_backward(self) -> None:
        if self.engine is not None:
            self.engine.finish_backward()

    def save_checkpoint(self, path: Path, client_state: dict[str, Any], *, weights_only: bool = False) -> None:
        engine = self._require_engine("save a checkpoint")
        engine.wait_all()
        names = parameter_names(self._module, engine.params)
        if weights_only:
            self._save_master_weights(engine, path, names, client_state)
            return
        state = {
            "format": FORMAT,
            "names": names,
            "shapes": [tuple(p.shape) for p in engine.params],
            # One tensor holding master weights, exp_avg and exp_avg_sq: written without a copy. The device weights
            # are not saved: they are always the master weights cast to the device dtype.
            "arena": engine.arena,
            # The state kept on the device passes through host memory while it is written (at most what the host
            # arena would hold for those parameters).
            "device_arena": engine.device_arena.cpu(),
            "host_params": engine.host_count,
            "steps": list(engine.steps),
            "param_groups": self._optimizer.state_dict()["param_groups"],
            "buffers": {k: v.detach().cpu() for k, v in persistent_buffers(self._module).items()},
            "client_state": client_state,
        }
        with atomic_directory(path) as staging:
            torch.save(state, staging / CHECKPOINT_FILE)

    def _save_master_weights(self, engine: HostAdamEngine, path: Path, names: list[list[str]],
                             client_state: dict[str, Any]) -> None:
        """The fp32 master weights without the Adam state, each copied out of its arena only while it is written."""
        state = {
            "format": FORMAT,
            "names": names,
            "shapes": [tuple(p.shape) for p in engine.params],
            "buffers": {k: v.detach().cpu() for k, v in persistent_buffers(self._module).items()},
            "client_state": client_state,
        }
        masters = ((str(index), engine.master_of(index).cpu()) for index in range(len(engine.params)))
        with atomic_directory(path, weights_only=True) as staging:
            write_state_dict(staging / CHECKPOINT_FILE, masters, around=lambda weights: {**state, MASTERS: weights})

    def load_checkpoint(self, path: Path, *, load_optimizer_states: bool, strict: bool) -> dict[str, Any]:
        state = read_checkpoint(path)
        engine = self.engine
        if engine is None:  # validate / test / predict from a checkpoint: weights only
            load_weights(self._module_for_inference(), state, strict)
            return state["client_state"]
        names = parameter_names(self._module, engine.params)
        if names != state["names"] or [tuple(p.shape) for p in engine.params] != state["shapes"]:
            raise ValueError(
                f"The checkpoint in {str(path)!r} holds other parameters than this model (names or shapes differ). "
                "Resume with the model it was saved from, or load its weights with "
                "`lightning_offload.consolidate(...)` and `module.load_state_dict(...)` before `fit`."
            )
        engine.wait_all()
        # Parameter by parameter: the checkpoint may split the state between host and device differently.
        for index, (master, exp_avg, exp_avg_sq) in enumerate(saved_parameters(state)):
            engine.master_of(index).copy_(master)
            if load_optimizer_states and exp_avg is not None:
                for target, saved in zip(engine.state_of(index), (exp_avg, exp_avg_sq)):
                    target.copy_(saved)
        if load_optimizer_states and MASTERS not in state:
            engine.steps[:] = state["steps"]
            for group, saved_group in zip(self._optimizer.param_groups, state["param_groups"]):
                group.update({k: v for k, v in saved_group.items() if k != "params"})
        engine.refresh_device_weights()
        load_buffers(self._module, state["buffers"], strict)
        return state["client_state"]

    def load_model_state_dict(self, module: torch.nn.Module, state_dict: dict[str, Any], strict: bool) -> None:
        """validate / test / predict from another backend's checkpoint (or Lightning's file): the weights the module
        computes with and, after a fit, the engine's fp32 master weights (which a later save or fit reads)."""
        engine = self.engine
        if engine is not None:
            engine.wait_all()
        super().load_model_state_dict(module, state_dict, strict)
        if engine is None:
            return
        for index, names in enumerate(parameter_names(self._module, engine.params)):
            saved = next((state_dict[name] for name in names if name in state_dict), None)
            if saved is not None:
                engine.master_of(index).copy_(saved)

    def _module_for_inference(self) -> torch.nn.Module:
        if self._module is None:
            raise RuntimeError("The `host_adam` backend loads inference checkpoints into the module it set up.")
        return self._module

    def _require_engine(self, action: str) -> HostAdamEngine:
        if self.engine is None or self._module is None:
            raise RuntimeError(f"The `host_adam` backend can {action} only after `fit` has set it up.")
        if self.engine.released:
            raise RuntimeError(
                f"Cannot {action}: this run's host state was released when a later `fit` started in this process. "
                "Save checkpoints before starting the next run."
            )
        return self.engine

    def teardown(self) -> None:
        if self.engine is not None:
            self.engine.wait_all()

    def describe(self) -> str:
        weights = "bf16" if _WEIGHT_DTYPES.get(self._precision) is torch.bfloat16 else "fp32"
        clipping = {None: "", "norm": "; clipping by norm holds updates until backward ends",
                    "value": "; gradients clipped by value on their way out"}[self._clip[0] if self._clip else None]
        front = ""
        if self.gpu_state_blocks:
            front = (f"; the first {self.gpu_state_blocks} blocks (and the parameters before them) keep their master "
                     f"weights and Adam state on {self._device}, updated there inside backward")
        return (
            f"host_adam ({self._precision}): {weights} weights and gradients on {self._device}; fp32 master weights "
            f"and Adam state in host memory, stepped by torch's fused CPU AdamW during backward, "
            f"{self.config.bucket_numel:,} parameters per bucket{front}{clipping}"
        )


def _release_with_module(engine: HostAdamEngine) -> None:
    HostAdamBackend._live.forget(engine)
    if not engine.released:
        engine.release()


def _clipping(setup: TrainingSetup) -> tuple[str, float] | None:
    if not setup.gradient_clip_val:
        return None
    algorithm = "value" if setup.gradient_clip_algorithm == "value" else "norm"  # Lightning validated the name
    if algorithm == "norm":
        warnings.warn(
            "Gradient clipping by global norm needs every gradient before any update, so the `host_adam` backend "
            "holds the updates until backward ends (exact, but the host step no longer overlaps backward, and the "
            "GPU keeps all gradients until then). Clip by value (`gradient_clip_algorithm='value'`) to keep the "
            "overlap.",
            stacklevel=2,
        )
    return algorithm, float(setup.gradient_clip_val)
