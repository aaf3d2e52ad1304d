"""Schemas of the `optimizer` and `checkpointing` config groups, registered in Hydra's ConfigStore.

Each YAML file of those groups starts from its schema, so a misspelt key fails at composition with Hydra's
"Key ... is not in struct"; misspelt values are refused by the strategy with the list of allowed ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

from lightning_offload.checkpointing import CheckpointingConfig


@dataclass
class OptimizerChoice:
    name: str | None = None
    """None keeps `configure_optimizers`' optimizer; else one of `lightning_offload.optim.OPTIMIZERS`."""


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(group="optimizer", name="schema", node=OptimizerChoice)
    store.store(group="checkpointing", name="schema", node=CheckpointingConfig)
