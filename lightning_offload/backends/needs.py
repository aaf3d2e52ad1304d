"""What a user's run asks of an engine beyond its model; read by the backends, the planner and the strategy."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunNeeds:
    """What the user's run asks of an engine beyond its model: built from the Trainer and the module at setup
    (`planner.lightning.run_needs`), from the training config by `lightning-offload plan`. Each `Backend` declares
    what of it it cannot run (`Backend.refusals`): the planner leaves such backends out under `backend="auto"`, and
    the strategy refuses a pinned one."""

    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str | None = None
    gradient_hooks: tuple[str, ...] = ()
    """The module and callbacks that override `on_before_optimizer_step` (they read the gradients before the step),
    by class name."""
    callbacks: tuple[tuple[str, ...], ...] = ()
    """Each callback's class names: its own, then its bases' (a backend refuses a callback by a base's name)."""
    manual_optimization: bool = False
    compile_blocks: bool = False
    resumes_lightning_file: bool = False
    """The fit resumes Lightning's own checkpoint file: only the backends that save that file can resume it."""
    precision: str | None = None
    """The Trainer's precision flag (`Trainer(precision=...)`): only the backends that train with it can run it;
    None: any precision."""
    processes: int = 1
    """The processes the run trains across: a refusal names only backends that train across that many."""

    @property
    def clipping(self) -> str | None:
        """How the Trainer clips gradients ("norm" or "value"); None: it does not."""
        if not self.gradient_clip_val:
            return None
        return "value" if self.gradient_clip_algorithm == "value" else "norm"  # Lightning validated the name

    @property
    def holds_gradients(self) -> bool:
        """Every gradient is needed before the first update: clipping by global norm, or a hook that reads them."""
        return self.clipping == "norm" or bool(self.gradient_hooks)
