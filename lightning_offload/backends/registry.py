"""The backends by name: each backend's module holds a `SPEC` (`backends.spec.BackendSpec`) with everything that
differs per backend; the planner, the strategies and checkpoint consolidation loop over these and never branch on a
backend's name. A new backend is a module (or package) in this folder with its `SPEC`, and one line below.

A spec's module is imported the first time it is asked for, so `import lightning_offload` stays quick; this
module imports none of the package, so the lowest layers (a `Plan` describing itself) may ask it too.
"""

from __future__ import annotations

from functools import cache
from importlib import import_module
from pathlib import Path
from typing import Any

# name -> the module whose `SPEC` describes it; engines' heavy imports happen inside their methods.
_SPEC_MODULES = {
    "deepspeed": "lightning_offload.backends.deepspeed",
    "device": "lightning_offload.backends.device",
    "fsdp": "lightning_offload.backends.fsdp",
    "gpu_8bit": "lightning_offload.backends.gpu_8bit",
    "host_adam": "lightning_offload.backends.host_adam.spec",
    "stream": "lightning_offload.backends.stream.spec",
}
# The plan with no model measurements across processes: the engine that trains anything that fits in the
# machines' memory, with its exact optimizer and every block checkpointed.
UNMEASURED_MULTI_PROCESS = "deepspeed"
# Nothing offloaded: the plan of a model that fits, and the one to pin where an engine cannot run the user's loop.
NO_OFFLOAD = "device"


def available_backends() -> list[str]:
    return sorted(_SPEC_MODULES)


def multi_process_backends() -> list[str]:
    """The backends that train across several processes (the others drive one GPU)."""
    return [name for name in available_backends() if spec(name).multi_process is not None]


def backends_training(precision: str) -> list[str]:
    """The backends whose engine trains with the Trainer precision `precision` (`Trainer(precision=...)`)."""
    return [name for name in available_backends() if precision in spec(name).engine.precisions]


@cache
def _load(name: str) -> Any:
    return import_module(_SPEC_MODULES[name]).SPEC


def spec(name: str) -> Any:
    """The `backends.spec.BackendSpec` of backend `name`."""
    if name not in _SPEC_MODULES:
        raise ValueError(f"Unknown backend {name!r}. Choose one of {['auto', *available_backends()]}.")
    return _load(name)


def pinned_levers(name: str | None) -> tuple[str, ...]:
    """The options of backend `name` (None: of any backend) that the planner takes as pinned levers."""
    names = available_backends() if name is None else [name]
    return tuple(dict.fromkeys(option for each in names for option in spec(each).pinned_levers))


def find(name: str) -> Any:
    """The spec of `name`, None for a name no backend has."""
    return _load(name) if name in _SPEC_MODULES else None


def specs() -> list[Any]:
    return [spec(name) for name in available_backends()]


def checkpoint_spec(folder: Path) -> Any:
    """The spec of the backend that wrote checkpoint folder `folder`, known by the files that mark it."""
    if not folder.exists():
        raise FileNotFoundError(f"The checkpoint {str(folder)!r} does not exist. Pass the path given to "
                                "`trainer.save_checkpoint` or written by `ModelCheckpoint`.")
    engines = [spec for spec in specs() if spec.checkpoint_files]
    for engine in engines:
        if any((folder / name).is_file() for name in engine.checkpoint_files):
            return engine
    files = [f"`{name}`" for engine in engines for name in engine.checkpoint_files]
    raise FileNotFoundError(
        f"{str(folder)!r} is not a `single_gpu_offload` checkpoint folder (it has no {', '.join(files[:-1])} "
        f"or {files[-1]} file). Pass the path given to `trainer.save_checkpoint` or written by `ModelCheckpoint`."
    )


def backend_class(name: str) -> Any:
    """The `Backend` subclass of backend `name`."""
    return spec(name).engine
