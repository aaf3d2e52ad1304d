"""The seam between the Lightning strategy and an engine.

`SingleGPUOffloadStrategy` owns everything Lightning expects of a strategy; a `Backend` owns one engine: how the
model is built and wrapped, how backward and the optimizer step run, and how state is saved and restored. A new
engine is a new module (or package) in this folder with a subclass of `Backend` and its `SPEC`
(`backends/spec.py`), named in `backends/registry.py`.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from types import ModuleType, UnionType
from typing import Any, ClassVar, Generic, TypeVar, Union, get_args, get_origin, get_type_hints

import torch
from torch.optim import Optimizer

from lightning_offload.backends import registry
from lightning_offload.backends.needs import RunNeeds
from lightning_offload.planner.budget import Available, HostBudget, host_memory_available

EngineT = TypeVar("EngineT")

# The Trainer precisions (`Trainer(precision=...)`) the strategy trains with; each engine trains with some of them.
TRAINER_PRECISIONS = ("bf16-mixed", "bf16-true", "16-mixed", "16-true", "32-true")

# The directions of `Backend.transfer_counters`: bytes copied from host to device memory, and back.
HOST_TO_DEVICE, DEVICE_TO_HOST = "host_to_device", "device_to_host"


@dataclass(kw_only=True)
class BackendConfig:
    """Base of every backend's knobs; each backend's `Config` subclasses it."""

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> BackendConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"Unknown option(s) {unknown} for this backend. Allowed: {sorted(known)}."
            )
        hints = get_type_hints(cls)
        wrong = [f"`{name}={value!r}` (expected {_type_name(hints[name])})"
                 for name, value in options.items() if not _matches(value, hints[name])]
        if wrong:
            raise TypeError(f"Wrong type for backend option(s): {', '.join(wrong)}. Pass values of those types.")
        return cls(**options)


_SCALARS = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}


def _matches(value: Any, hint: Any) -> bool:
    """Whether `value` fits a scalar type hint (`bool`, `int | None`, ...); other hints are the backend's to check."""
    members = get_args(hint) if isinstance(hint, UnionType) or get_origin(hint) is Union else (hint,)
    if value is None:
        return type(None) in members or not all(m in _SCALARS or m is type(None) for m in members)
    for member in members:
        if member not in _SCALARS:
            return True
        if isinstance(value, _SCALARS[member]) and (member is bool or not isinstance(value, bool)):
            return True
    return False


def _either(names: Sequence[str], form: Callable[[str], str] = repr) -> str:
    """'a', 'b' or 'c' (each name as `form` writes it)."""
    written = [form(name) for name in names]
    return " or ".join(filter(None, [", ".join(written[:-1]), written[-1]])) if written else "none"


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint)


class LastEngine(Generic[EngineT]):
    """The engine of the last fit in this process. It stays alive after `fit` returns, so `trainer.save_checkpoint`
    still works, and is handed over when the next one is built (one GPU trains one model at a time); a fit with
    another backend releases it (`release_other_engines`). Engines have a `release()` that frees their memory.

    `weak=True` holds it only while the run does (its Trainer or model, which reach the engine): an engine that
    holds the model itself would otherwise keep a run the user dropped alive until the next fit."""

    # Every backend's holder, so that a fit with one backend finds the engines the others left.
    _holders: ClassVar[list[LastEngine[Any]]] = []

    def __init__(self, *, weak: bool = False) -> None:
        self._engine: EngineT | weakref.ref[EngineT] | None = None
        self._weak = weak
        LastEngine._holders.append(self)

    def take(self) -> EngineT | None:
        """The previous engine, for the caller to release; none is kept until `keep`."""
        previous, self._engine = self._held(), None
        return previous

    def keep(self, engine: EngineT) -> None:
        self._engine = weakref.ref(engine) if self._weak else engine

    def forget(self, engine: EngineT) -> None:
        """`engine` was released: it is no longer the one to hand over."""
        if self._held() is engine:
            self._engine = None

    def _held(self) -> EngineT | None:
        return self._engine() if isinstance(self._engine, weakref.ref) else self._engine


def release_other_engines(backend: Backend) -> None:
    """Releases the engines that fits with other backends left alive in this process, before `backend` builds its
    own: a notebook or sweep that switches backends must not keep the earlier run's model and host state."""
    own = getattr(type(backend), "_live", None)
    for holder in LastEngine._holders:
        if holder is not own:
            engine = holder.take()
            if engine is not None:
                engine.release()


def persistent_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The buffers a state dict holds (a checkpoint has no others)."""
    found = {}
    for name, buffer in module.named_buffers():
        owner, _, leaf = name.rpartition(".")
        if leaf not in module.get_submodule(owner)._non_persistent_buffers_set:
            found[name] = buffer
    return found


def _copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    target.data.copy_(value)


def copy_weights_by_name(targets: dict[str, torch.Tensor], tensors: Iterable[tuple[str, torch.Tensor]],
                         checkpoint: str, strict: bool,
                         copy: Callable[[torch.Tensor, torch.Tensor], None] = _copy_into) -> None:
    """Copies each (name, tensor) of a checkpoint into the tensor of `targets` under that name (the engine's own
    parameters and buffers) with `copy`; with `strict`, a name either side lacks is refused, as `load_state_dict`
    refuses it. `checkpoint` names it in messages ("The checkpoint 'last.ckpt'")."""
    loaded = set()
    for name, value in tensors:
        target = targets.get(name)
        if target is None:
            if strict:
                raise KeyError(f"{checkpoint} has `{name}`, which this model lacks. Load it into the model it was "
                               "saved from, or set `strict_loading = False` on the module.")
            continue
        copy(target, value)
        loaded.add(name)
    missing = sorted(set(targets) - loaded)
    if strict and missing:
        raise KeyError(f"{checkpoint} lacks {missing[:5]} of this model. Load the checkpoint of this model, or set "
                       "`strict_loading = False` on the module.")


@dataclass(frozen=True)
class TrainingSetup:
    """What a backend needs from the Trainer to build its training engine."""

    precision: str
    accumulate_grad_batches: int
    gradient_clip_val: float | None
    gradient_clip_algorithm: str | None
    gradient_hooks: tuple[str, ...] = ()
    """The module and callbacks that override `on_before_optimizer_step`: they read (or change) the gradients after
    backward, before the step."""
    weights_read_after_step: bool = False
    """A callback (weight averaging) reads every parameter after each optimizer step, outside the module's forward."""


class Backend(ABC):
    name: ClassVar[str]
    Config: ClassVar[type[BackendConfig]]
    # True when the engine saves parameters and optimizer state itself, so Lightning must not.
    saves_own_state: ClassVar[bool] = False
    # Options of `Config` a user may give under `backend="auto"`: they change no plan's memory or speed, and apply
    # when the planner picks this engine.
    options_under_auto: ClassVar[frozenset[str]] = frozenset()
    # Why `compile_blocks=True` cannot work with this engine (it hooks modules inside a block, where a compiled
    # block's graph would not call them); None: it can.
    compile_blocks_refusal: ClassVar[str | None] = None
    # Why this engine cannot honour manual optimization (`automatic_optimization = False`: the module calls
    # `manual_backward`, `opt.step()` and `opt.zero_grad()` itself) exactly; None: it can.
    manual_optimization_refusal: ClassVar[str | None] = None
    # Why `on_before_optimizer_step` hooks would see no gradients under this engine (it consumes them inside
    # backward); None: the gradients are on the parameters when Lightning calls the hook.
    gradient_hooks_refusal: ClassVar[str | None] = None
    # Lightning callbacks this engine cannot run, by class name (subclasses included): why, and what to do instead.
    callback_refusals: ClassVar[dict[str, str]] = {}
    # Why this engine cannot clip gradients, by `gradient_clip_algorithm` ("norm", "value"), and what to do instead.
    clipping_refusals: ClassVar[dict[str, str]] = {}
    # The Trainer precisions this engine trains with: the planner leaves it out for the others, `set_precision`
    # refuses them.
    precisions: ClassVar[tuple[str, ...]] = TRAINER_PRECISIONS
    # What its refusal of another precision says after "... is not supported by the `name` backend": why, then which
    # of `precisions` to use.
    precision_advice: ClassVar[str] = ""

    @classmethod
    def options_given_under_auto(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The `options` given under `backend="auto"` that this engine takes when the planner picks it."""
        return {name: value for name, value in options.items() if name in cls.options_under_auto}

    @classmethod
    def precision_refusal(cls, precision: str, processes: int = 1) -> str | None:
        """Why this engine cannot train with `precision`, naming the precisions it trains with and the backends that
        train with `precision` (across `processes` processes); None: it can."""
        if precision in cls.precisions:
            return None
        advice = cls.precision_advice or f". Use {_either(cls.precisions)}"
        eligible = registry.multi_process_backends() if processes > 1 else registry.available_backends()
        others = [name for name in registry.backends_training(precision) if name != cls.name and name in eligible]
        pins = _either(others, lambda name: f"`backend={name!r}`")
        instead = (f"; to keep {precision!r}, pin {pins}, or leave `backend='auto'` (the fastest of these that fits)"
                   if others else "")
        return f"`Trainer(precision={precision!r})` is not supported by the `{cls.name}` backend{advice}{instead}."

    @classmethod
    def refusals(cls, needs: RunNeeds) -> list[tuple[str, str]]:
        """What of the run `needs` this engine cannot run: (the feature, briefly, for the planner's table; the
        refusal naming the feature and the fix), in the order the strategy checks them. Empty: it runs them all."""
        found = []
        if needs.precision is not None and (
                refusal := cls.precision_refusal(needs.precision, needs.processes)) is not None:
            found.append((f"`precision={needs.precision!r}` (it trains {_either(cls.precisions)})", refusal))
        if needs.compile_blocks and cls.compile_blocks_refusal is not None:
            found.append(("`compile_blocks=True`", (
                f"`compile_blocks=True` does not work with backend {cls.name!r}: {cls.compile_blocks_refusal} Pin "
                "another backend, or set `compile_blocks=False`.")))
        if needs.manual_optimization and cls.manual_optimization_refusal is not None:
            found.append(("manual optimization", (
                f"Manual optimization (`automatic_optimization = False`) cannot be honoured by backend {cls.name!r}: "
                f"{cls.manual_optimization_refusal} Pin `backend={registry.NO_OFFLOAD!r}` (steps exactly when you "
                "call `opt.step()`), or use automatic optimization with `Trainer(accumulate_grad_batches=...)`.")))
        for names in needs.callbacks:
            refused = next((name for name in names if name in cls.callback_refusals), None)
            if refused is not None:
                found.append((f"`{names[0]}`", f"`{names[0]}` cannot run with backend {cls.name!r}: "
                                               f"{cls.callback_refusals[refused]}"))
        if needs.gradient_hooks and cls.gradient_hooks_refusal is not None:
            hooks = " and ".join(f"`{owner}`" for owner in needs.gradient_hooks)
            verb = "override" if len(needs.gradient_hooks) > 1 else "overrides"
            found.append((f"{hooks}'s `on_before_optimizer_step`, which reads the gradients before the step", (
                f"{hooks} {verb} `on_before_optimizer_step`, where Lightning shows the gradients before each "
                f"optimizer step, but backend {cls.name!r} {cls.gradient_hooks_refusal} The hook would see no "
                "gradient, and changes it made to them would be lost. Pin `backend='fsdp'` or `'gpu_8bit'` (gradients "
                "stay on the parameters until the step), or move code that does not need the gradients to "
                "`on_train_batch_end`.")))
        if needs.resumes_lightning_file and cls.saves_own_state:
            found.append(("resuming Lightning's checkpoint file", (
                f"`fit(ckpt_path=...)` resumes Lightning's single checkpoint file, and backend {cls.name!r} resumes "
                "only its own checkpoint folders. Resume with a backend that saves Lightning's file, or start a new "
                "fit from its weights: `model = MyModule.load_from_checkpoint(...)`, then `trainer.fit(model)`.")))
        if needs.clipping in cls.clipping_refusals:
            flags = (f"gradient_clip_val={needs.gradient_clip_val}, "
                     f"gradient_clip_algorithm={needs.gradient_clip_algorithm!r}")
            found.append((f"clipping by {needs.clipping} (`gradient_clip_val`)",
                          f"`Trainer({flags})`: the {cls.name!r} backend {cls.clipping_refusals[needs.clipping]}"))
        return found

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self._planned_options: dict[str, Any] = {}
        self.host_budget: HostBudget | None = None
        """The run's host budget (the strategy's `max_host_memory_gib`), which the engine's host allocations keep to."""

    def host_memory_available(self) -> Available:
        """Host memory the engine may still allocate: what is available, within the job's cgroup memory limit and
        what is left of the run's host budget."""
        return self.host_budget.room() if self.host_budget is not None else host_memory_available()

    def setup_environment(self, device: torch.device) -> None:
        """Runs before `configure_model`: process groups, device selection, engine-global settings."""

    def adopt_plan(self, plan: Any) -> None:
        """The planner's chosen plan (`lightning_offload.planner.Plan`) for this pinned backend: it fills in the
        options the user left to the planner (None in the config; read with `configured_or_planned`)."""
        if plan.backend == self.name:
            self._planned_options = registry.spec(self.name).options_of(plan)

    def configured_or_planned(self, option: str, default: Any) -> Any:
        """The configured `option`, else the plan's, else `default` (no plan ran)."""
        configured = getattr(self.config, option)
        return configured if configured is not None else self._planned_options.get(option, default)

    def precision_plugin(self, plugins: ModuleType, precision: str, trainer_plugin: Any) -> Any:
        """The Lightning precision plugin to train with; `plugins` is the namespace's `plugins.precision` module and
        `trainer_plugin` the one the Trainer built from its `precision=` flag."""
        return trainer_plugin

    def set_precision(self, precision: str) -> None:
        """Receives the Trainer's precision flag before the model is built; raises if the engine cannot run it."""
        refusal = self.precision_refusal(precision)
        if refusal is not None:
            raise ValueError(refusal)
        self._precision = precision

    def prepare_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Runs before `configure_optimizers`, for engines that replace parameters (sharding)."""
        return module

    def updates_inside_backward(self) -> bool:
        """Whether this run's engine updates parameters during backward: inside a step, the model is then partly a
        step ahead of its step counter."""
        return False

    def before_backward(self, last_micro_batch: bool) -> None:
        """Runs before every backward; `last_micro_batch` is False while gradients accumulate, True on the backward
        that the optimizer step follows (engines that update inside backward need to know which one it is)."""

    def after_backward(self) -> None:
        """Runs after every backward, before gradient clipping and the optimizer step."""

    def model_state_dict(self, module: torch.nn.Module) -> dict[str, Any]:
        """The module's weights as plain tensors, for Lightning's checkpoint (engines that save their own: unused)."""
        return module.state_dict()

    def load_model_state_dict(self, module: torch.nn.Module, state_dict: dict[str, Any], strict: bool) -> None:
        module.load_state_dict(state_dict, strict=strict)

    def optimizer_state_dict(self, module: torch.nn.Module, optimizer: Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, module: torch.nn.Module, optimizer: Optimizer, state: dict[str, Any]) -> None:
        """Restores `optimizer`; its state stays where the engine steps it."""
        optimizer.load_state_dict(state)

    def optimizer_state_device(self, device: torch.device) -> torch.device:
        """Where the optimizer steps: the training device unless the engine offloads the optimizer."""
        return device

    def prepare_optimizer(self, optimizer: Optimizer) -> Optimizer:
        """The optimizer the engine steps, built from the user's (same hyperparameters and param groups)."""
        return optimizer

    def model_init_context(self) -> AbstractContextManager:
        """Context in which `LightningModule.configure_model` builds the model."""
        return nullcontext()

    @abstractmethod
    def setup_training(
        self, module: torch.nn.Module, optimizer: Optimizer, setup: TrainingSetup
    ) -> tuple[torch.nn.Module, Optimizer]:
        """Wraps the module and optimizer for training; returns the model Lightning calls and the optimizer it steps."""

    @abstractmethod
    def setup_inference(self, module: torch.nn.Module, precision: str) -> torch.nn.Module:
        """Wraps the module for validate / test / predict."""

    def save_checkpoint(self, path: Path, client_state: dict[str, Any], *, weights_only: bool = False) -> None:
        """Writes the engine's folder at `path` (`saving.atomic_directory`); `weights_only`: without the optimizer
        state (the folder marked so), as Lightning's `save_checkpoint(..., weights_only=True)` asks."""
        raise NotImplementedError(f"The {self.name!r} backend does not save its own state.")

    def load_checkpoint(self, path: Path, *, load_optimizer_states: bool, strict: bool) -> dict[str, Any]:
        raise NotImplementedError(f"The {self.name!r} backend does not load its own state.")

    def transfer_counters(self) -> dict[str, int]:
        """Bytes the engine has copied between host and device memory so far, by direction (`HOST_TO_DEVICE`,
        `DEVICE_TO_HOST`), for telemetry; empty for an engine that keeps everything on the device."""
        return {}

    def teardown(self) -> None:
        """End of a fit: free what is not needed to save a checkpoint; the process may train again afterwards."""

    @abstractmethod
    def describe(self) -> str:
        """One line saying where parameters, gradients and optimizer state live."""
