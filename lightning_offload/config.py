"""Schemas of the `optimizer` and `activation_checkpointing` config groups, registered in Hydra's ConfigStore.

Each YAML file of those groups starts from its schema, so a misspelt key fails at composition with Hydra's
"Key ... is not in struct"; misspelt values are refused by the strategy with the list of allowed ones.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from lightning_offload.activation_checkpointing import CheckpointingConfig


@dataclass
class OptimizerChoice:
    name: str | None = None
    """None keeps `configure_optimizers`' optimizer; else one of `lightning_offload.optim.OPTIMIZERS`."""


def register_configs() -> None:
    # `${config_json:PATH,KEY}`: a key of a transformers config.json (conf/model/hf.yaml's vocabulary, for the data).
    OmegaConf.register_new_resolver("config_json", _config_json_value, replace=True)
    store = ConfigStore.instance()
    store.store(group="optimizer", name="schema", node=OptimizerChoice)
    store.store(group="activation_checkpointing", name="schema", node=CheckpointingConfig)


def warn_deprecated_names(cfg: Any) -> None:
    """Warns once per former config name the run chose: such a config (e.g. `conf/strategy/gpu_only.yaml`) includes
    its new one and adds `deprecated: {group: {old, new}}` to the composed config."""
    for entry in (cfg.get("deprecated") or {}).values():
        warnings.warn(f"`{entry.old}` is deprecated and will be removed in the next release; use `{entry.new}`.",
                      FutureWarning, stacklevel=2)


def _config_json_value(path: str | None, key: str) -> Any:
    from lightning_offload.models import config_json_value

    return config_json_value(path, key)


# (key, smallest allowed value, an example) of the numbers the main job's config must hold; None: may be null.
_INTEGERS = (
    ("trainer.max_steps", -1, 400), ("trainer.accumulate_grad_batches", 1, 4), ("trainer.num_nodes", 1, 1),
    ("trainer.log_every_n_steps", 1, 10), ("data.batch_size", 1, 16), ("data.seq_len", 1, 128),
    ("data.max_bytes", 1, 2_000_000), ("data.num_batches", 1, 64), ("data.num_workers", 0, 2),
)
_NUMBERS = (("trainer.gradient_clip_val", 0.0, 1.0),)
_FRACTIONS = (("data.val_fraction", 0.05),)


def _lookup(cfg: Any, key: str) -> tuple[bool, Any]:
    node = cfg
    for part in key.split("."):
        if part not in node:
            return False, None
        node = node[part]
    return True, node


def check_run_config(cfg: Any) -> None:
    """Refuses, before anything is built, a main-job config whose trainer or data settings have the wrong type or
    range, or whose output folder cannot be written, with one message naming the key and a valid value."""
    problems = []
    for key, smallest, example in _INTEGERS:
        present, value = _lookup(cfg, key)
        if present and (isinstance(value, bool) or not isinstance(value, int) or value < smallest):
            problems.append(f"`{key}` must be an integer >= {smallest}, got {value!r} (e.g. {key}={example})")
    for key, smallest, example in _NUMBERS:
        present, value = _lookup(cfg, key)
        if present and value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                              or value < smallest):
            problems.append(f"`{key}` must be null or a number >= {smallest}, got {value!r} (e.g. {key}={example})")
    for key, example in _FRACTIONS:
        present, value = _lookup(cfg, key)
        if present and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1):
            problems.append(f"`{key}` must be a number between 0 and 1, got {value!r} (e.g. {key}={example})")
    if problems:
        raise ValueError("Invalid config: " + "; ".join(problems) + ".")
    present, root = _lookup(cfg, "trainer.default_root_dir")
    if present and root:
        _check_writable(Path(str(root)))


def _check_writable(folder: Path, key: str = "hydra.run.dir") -> None:
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not _can_create_in(existing):
        raise PermissionError(
            f"The run's output folder {str(folder)!r} cannot be written ({str(existing)!r} is not a writable "
            f"folder). Pass a writable one, e.g. `{key}=outputs/my_run`."
        )


def _can_create_in(folder: Path) -> bool:
    """Whether a folder can be made in `folder`: tried, since root passes every permission check yet cannot create
    inside /proc or on a read-only mount."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        os.rmdir(tempfile.mkdtemp(dir=folder))
    except OSError:
        return False
    return True


class OutputFolderCheck(Callback):
    """Refuses an unwritable output folder before Hydra creates it, which would fail with a bare `mkdir` error.

    It exits with the message: Hydra turns a callback's exceptions into warnings and goes on."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        _exit_unless_writable(Path(str(config.hydra.run.dir)), "hydra.run.dir")

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        _exit_unless_writable(Path(str(config.hydra.sweep.dir)), "hydra.sweep.dir")


def _exit_unless_writable(folder: Path, key: str) -> None:
    try:
        _check_writable(folder, key)
    except PermissionError as error:
        raise SystemExit(f"Error: {error}") from None
