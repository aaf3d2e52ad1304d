"""What differs per backend, in one record: what torchtitan's `ModelSpec` is for a model.

Each backend's module ends with its `SPEC`; `backends.registry` finds it by name. The planner reads the memory and
step-time terms and the candidate plans from it, the strategies read whether it spans processes and which plan
levers are its options, and `consolidate` and `export_hf` read its checkpoint folders with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from lightning_offload.backends.base import Backend
    from lightning_offload.planner.measure import ModelStats
    from lightning_offload.planner.terms import CandidateLevers, MemoryInputs, MemoryTerms, Plan, StepInputs, StepTime


@dataclass
class SavedTensor:
    """One tensor of a checkpoint under every name it has, read only when `load()` is called."""

    names: list[str]
    shape: tuple[int, ...]
    dtype: torch.dtype
    """The dtype it was saved in: an export casts floating tensors to its own dtype, and keeps every other one's
    (an integer counter, a bool mask)."""
    load: Callable[[], torch.Tensor]


def grouped(items: Iterable[tuple[str, Any]], key: Callable[[Any], Any]) -> list[SavedTensor]:
    """One `SavedTensor` per tensor of (name, tensor or lazy tensor) `items`, with all the names it is saved under
    (a tied embedding and output layer): `key` tells two names of one tensor."""
    import torch

    groups: dict[Any, SavedTensor] = {}
    for name, value in items:
        if not hasattr(value, "shape"):
            continue
        found = groups.get(key(value))
        if found is None:
            groups[key(value)] = SavedTensor([name], tuple(value.shape), value.dtype,
                                             lambda v=value: v if isinstance(v, torch.Tensor) else v.contiguous())
        else:
            found.names.append(name)
    return list(groups.values())


@dataclass(frozen=True)
class MultiProcess:
    """How a backend trains across processes: the GPU terms each rank adds (`stats` -> term -> bytes), and whether
    its state is sharded over the ranks (else each rank holds it whole)."""

    shards_state: bool
    gpu_terms: Callable[[ModelStats], dict[str, int]] = lambda stats: {}


def _one_plan(base: Plan, stats: ModelStats, levers: CandidateLevers) -> list[Plan]:
    return [base]


def _no_options(plan: Plan) -> dict[str, Any]:
    return {}


def _no_detail(plan: Plan) -> str:
    return ""


def _no_exclusion(stats: ModelStats, checkpointing: str | None) -> str | None:
    return None


def _keeps_pinned(optimizer: str) -> str | None:
    return optimizer


@dataclass(frozen=True, kw_only=True)
class BackendSpec:
    name: str
    engine: type[Backend]
    """The `Backend` the strategy drives; its `Config` holds the backend's options and their defaults."""
    memory_terms: Callable[[MemoryInputs], MemoryTerms]
    """The backend's bytes per tier, term by term, beside the terms every plan has (activations, the process)."""
    step_time: Callable[[StepInputs], StepTime]
    checkpoint_weight_bytes: float
    """Bytes per parameter of the weights a checkpoint holds (in the precision the engine keeps as the truth)."""
    built_on_gpu: Callable[[MemoryInputs], int] | None = None
    """Bytes a model built in `configure_model` takes on the GPU as the engine's build context leaves it, before the
    engine converts it (`memory_terms` count what the step holds); None: no more than its step's weights."""
    exact_optimizer: str | None = None
    """The optimizer state it keeps for the user's own AdamW (fp32 state); None: it has no exact plan."""
    eight_bit_optimizer: str | None = None
    """The 8-bit optimizer state it keeps when 8-bit state is allowed; None: none."""
    pinned_optimizer: Callable[[str], str | None] = _keeps_pinned
    """The optimizer state it keeps for a pinned `optimizer=`; None: it cannot step that one."""
    own_adamw: bool = False
    """It updates with its own AdamW (inside backward or on the host): the user's optimizer must be Adam/AdamW, and
    the strategy's `optimizer=` stays unset."""
    needs_cuda: bool = False
    """It only pays off with a GPU (it still runs on a CPU device when pinned, for tests)."""
    policies: tuple[str, ...] | None = None
    """The checkpointing policies it runs under; None: every one."""
    exclusion: Callable[[ModelStats, str | None], str | None] = _no_exclusion
    """Why it has no plan for this model under this pinned checkpointing policy, beyond the generic reasons."""
    plan_variants: Callable[[Plan, ModelStats, CandidateLevers], list[Plan]] = _one_plan
    """Its candidate plans for one optimizer and policy: the base plan with its own levers set."""
    sizes_blocks_on_gpu: bool = False
    """A plan with `resident_blocks=None` is sized by the planner to the most blocks on the GPU that fit."""
    sizes_blocks_on_disk: Callable[[ModelStats, Plan, Callable[[Plan], dict[str, float]]], Plan] | None = None
    """Sizes a plan with `disk_blocks=None` (given the model and a plan's shortfall per tier) to the fewest blocks'
    state on disk that fit; None: its plans keep no blocks on disk."""
    exact_pinned_host: bool = False
    """Its pinned host terms are allocated at exactly their estimated size (no margin needed on them)."""
    plan_detail: Callable[[Plan], str] = _no_detail
    """What a plan's description adds for its own levers (", 4 resident blocks")."""
    keeps_state_on_disk: bool = False
    """Its plans may keep state on a disk (`offload_device="nvme"`)."""
    options_of: Callable[[Plan], dict[str, Any]] = _no_options
    """The plan's levers as the backend's `Config` options."""
    pinned_levers: tuple[str, ...] = ()
    """Options of its `Config` that a pinned engine hands the planner (keywords of `planner.plan`): where the user set
    them, they bound its plans."""
    multi_process: MultiProcess | None = None
    """How it spans processes; None: it drives one GPU."""
    holds_gradients_to_clip_by_value: bool = False
    """Clipping by value (`gradient_clip_algorithm="value"`) makes it keep every gradient until the step: Lightning
    clips them after backward, so an engine that updates inside backward waits for all of them."""
    runs_compiled_modules: bool = False
    """It trains a module the user compiled (`torch.compile(layer)`): it hooks no layer inside one."""
    checkpoint_files: tuple[str, ...] = ()
    """Files that mark a checkpoint folder it wrote."""
    fp32_tensors: Callable[[Path], Iterator[tuple[str, torch.Tensor]]] | None = None
    """(name, fp32 weight or buffer) of a checkpoint folder it wrote, one at a time, every name of a tied weight
    included (`consolidate` writes them as they come); None: it saves Lightning's own file."""
    saved_weights: Callable[[Path], list[SavedTensor]] | None = None
    """Every weight and buffer of a checkpoint folder it wrote, with its names and shape, each read when loaded in
    the precision it was saved in (`export_hf` maps one at a time); None: it saves Lightning's own file."""
    client_state: Callable[..., dict[str, Any]] | None = None
    """Lightning's own state (loops, callbacks, hyperparameters) in a checkpoint folder it wrote, which
    `load_from_checkpoint` reads beside the weights (keyword `weights_only`, as `torch.load`'s, default False);
    None: it saves Lightning's own file."""
