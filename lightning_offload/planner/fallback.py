"""Planning when the meta measurement cannot run: the memory check is kept, from what is known without a forward.

Two failures, two answers:
- The module cannot be built on the meta device (``from_pretrained`` in ``configure_model`` refuses a meta context):
  `BuildBeforePlanning` asks the strategy to let Lightning's own ``configure_model`` call build it in host memory
  and to plan from the built model at setup. The checkpoint the hook loads is sized from its safetensors headers
  first, so a model that cannot fit in host memory is refused before it is read.
- The model exists (built in ``__init__``, in host memory, or on meta) but its forward cannot run on meta tensors (a
  custom op without a meta kernel, a shape read from tensor values): `estimate_stats` counts its parameters as they
  are and estimates its activations from the batch's shape with a bound that errs high, and the plan keeps
  `UNMEASURED_MARGIN` free instead of `SAFETY_MARGIN`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_offload._safetensors import read_folder
from lightning_offload.activation_checkpointing import find_blocks
from lightning_offload.planner.choose import PlanDoesNotFit, parameter_count
from lightning_offload.planner.measure import ModelStats, _output_layers, _tensors, _to_meta, _tokens
from lightning_offload.planner.budget import GIB
from lightning_offload.planner.memory import Machine

# Fraction of each memory tier a plan from estimated activations may fill: the measured plans' 0.9, less 0.1 for
# what the estimate cannot see (extra buffers a custom op keeps, its workspace).
UNMEASURED_MARGIN = 0.8
# The activation bound's bytes per saved element: fp32, though bf16-mixed saves most tensors in bf16.
ESTIMATE_ELEMENT_BYTES = 4
# Elements per token of a block's width that a block saves besides its Linears' inputs and outputs (norm inputs and
# statistics, residual sums, activation-function inputs): twice what transformer blocks save.
ELEMENTWISE_WIDTHS = 8
# Bytes per logit saved outside the blocks: the bf16 logits and the loss's fp32 log-softmax.
LOGIT_SAVED_BYTES = 2 + 4


class BuildBeforePlanning(Exception):
    """The module builds its network in ``configure_model`` and cannot do so on the meta device: build it in host
    memory first, then plan from the built model. `reason`: why; `message`: that and what was checked before
    building; `example`: the batch (on meta) and step fetched for the measurement, to measure with once built
    rather than fetch the first batch again."""

    def __init__(self, reason: str, message: str, example: tuple[Any, Any] | None = None) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message
        self.example = None if example is None else (_to_meta(example[0]), example[1])


@dataclass(frozen=True)
class CheckpointSize:
    """A safetensors checkpoint's tensors, counted from the files' headers without reading a weight."""

    folder: Path
    parameters: int
    bytes: int


def build_first(module: nn.Module, error: Exception, machine: Machine,
                example: tuple[Any, Any] | None = None) -> BuildBeforePlanning:
    """What the strategy is told when `module`'s ``configure_model`` failed on the meta device with `error` (while
    measuring with `example`, a batch and step); a checkpoint that ``from_pretrained`` was loading is sized first,
    and refused when host memory cannot hold it."""
    name = type(module).__name__
    why = f"{name} cannot be built on the meta device ({type(error).__name__}: {_first_line(error)})"
    checkpoint, dtype = _checkpoint_loaded_by(error)
    if checkpoint is None:
        return BuildBeforePlanning(why, (
            f"{why}: it is built in host memory first and planned from the built model; its host memory is not "
            "checked before it is built (no safetensors checkpoint was found behind the failure)."
        ), example)
    # Loaded in the dtype the hook asks for, else (`dtype="auto"`) in the checkpoint's own.
    needed = checkpoint.bytes if dtype is None else checkpoint.parameters * dtype.itemsize
    room = UNMEASURED_MARGIN * machine.host_memory_gib * GIB
    if needed > room:
        raise PlanDoesNotFit(
            f"{why}, and building it in host memory would need {needed / GIB:.1f} GiB for the "
            f"{parameter_count(checkpoint.parameters)} parameters of {str(checkpoint.folder)!r}, more than "
            f"{100 * UNMEASURED_MARGIN:.0f}% of the {machine.host_memory_gib:.1f} GiB of host RAM free. Free host "
            "RAM, or build the network from its config in `configure_model` (`AutoModelForCausalLM.from_config(...)`, "
            "which the meta device can run and the engine places without a host copy) and load the weights after."
        )
    return BuildBeforePlanning(why, (
        f"{why}: it is built in host memory first ({needed / GIB:.1f} GiB for the "
        f"{parameter_count(checkpoint.parameters)} parameters in {str(checkpoint.folder)!r}, which fits) and planned "
        "from the built model."
    ), example)


def checkpoint_size(folder: Path) -> CheckpointSize | None:
    """The tensors of the `save_pretrained` checkpoint in `folder`, from its files' headers; None when it has none."""
    try:
        entries = read_folder(folder)
    except FileNotFoundError:
        return None
    return CheckpointSize(folder, sum(math.prod(entry.shape) for entry in entries.values()),
                          sum(entry.end - entry.start for entry in entries.values()))


def _checkpoint_loaded_by(error: BaseException) -> tuple[CheckpointSize | None, torch.dtype | None]:
    """The checkpoint a failed `from_pretrained` was loading and the dtype it was asked for (None: its own).

    transformers' `from_pretrained(pretrained_model_name_or_path, ..., dtype=...)` is on the failure's stack: its
    arguments name the folder and the dtype."""
    checkpoint, dtype = None, None
    traceback = error.__traceback__
    while traceback is not None:
        frame = traceback.tb_frame.f_locals
        source = frame.get("pretrained_model_name_or_path")
        if isinstance(source, (str, Path)) and Path(source).is_dir():
            checkpoint = checkpoint or checkpoint_size(Path(source))
            arguments = {**frame, **(frame.get("kwargs") if isinstance(frame.get("kwargs"), dict) else {})}
            asked = next((arguments[k] for k in ("dtype", "torch_dtype") if isinstance(arguments.get(k), torch.dtype)),
                         None)
            dtype = dtype or asked
        traceback = traceback.tb_next
    return checkpoint, dtype


def estimate_stats(module: nn.Module, batch: Any) -> ModelStats:
    """`module`'s parameters as they are and an upper bound of its activations at `batch`'s shape (no forward).

    Per block, every Linear's input and output and `ELEMENTWISE_WIDTHS` tensors of the block's width are counted as
    saved for backward, each in fp32: a transformer block saves each Linear's input (its output only where an
    activation function or attention reads it) in bf16, and under twice that many elementwise tensors, so the bound
    is at least twice what it saves. Attention is assumed fused (no sequence x sequence matrix), as on GPUs. Outside
    the blocks: the embedding's and final norm's outputs (`ELEMENTWISE_WIDTHS` widths) and the full logits, bf16
    and fp32 log-softmax. `batch` None: no batch to estimate from, activations count zero.
    """
    blocks = find_blocks(module)
    first = next(_tensors(batch), None) if batch is not None else None
    positions = 0 if first is None else first.numel() // (first.shape[-1] if first.is_floating_point() else 1)
    width = _width(module, blocks)
    linears = [m for m in blocks[0].modules() if isinstance(m, nn.Linear)] if blocks else []
    per_token = sum(m.in_features + m.out_features for m in linears) + ELEMENTWISE_WIDTHS * width
    vocabulary = max((m.out_features for m in _output_layers(module, blocks)), default=0)
    block_parameters = list(blocks[0].parameters()) if blocks else []
    parameters = list(module.parameters())
    embeddings = [m.weight for m in module.modules() if isinstance(m, nn.Embedding)]
    return ModelStats(
        parameters=_count(parameters),
        block_parameters=_count(block_parameters),
        frozen_parameters=_count(p for p in parameters if not p.requires_grad),
        frozen_block_parameters=_count(p for p in block_parameters if not p.requires_grad),
        blocks=len(blocks),
        activation_bytes_per_block=positions * per_token * ESTIMATE_ELEMENT_BYTES,
        block_input_bytes=positions * width * ESTIMATE_ELEMENT_BYTES,
        logits=positions * vocabulary,
        embedding_parameters=_count(embeddings),
        frozen_embedding_parameters=_count(p for p in embeddings if not p.requires_grad),
        tokens=_tokens(batch) if batch is not None else 0,
        outside_block_activation_bytes=positions * (ELEMENTWISE_WIDTHS * width * ESTIMATE_ELEMENT_BYTES
                                                    + LOGIT_SAVED_BYTES * vocabulary),
        width=width,
    )


def unmeasured_note(module: nn.Module, error: BaseException, batch: Any) -> str:
    """The one line a plan from `estimate_stats` carries."""
    activations = ("activations bounded from the first batch's shape (`planner.fallback.estimate_stats`)"
                   if batch is not None else "activations not counted (no batch to size them)")
    return (f"No measured memory check ran: {type(module).__name__}'s forward cannot run on the meta device "
            f"({type(error).__name__}: {_first_line(error)}). Planned from its parameters with {activations}, "
            f"keeping {100 * (1 - UNMEASURED_MARGIN):.0f}% of each memory tier free.")


def _width(module: nn.Module, blocks: list[nn.Module]) -> int:
    """Features per token entering a block: its first Linear's inputs, else the widest embedding."""
    first_linear = next((m for block in blocks[:1] for m in block.modules() if isinstance(m, nn.Linear)), None)
    if first_linear is not None:
        return first_linear.in_features
    return max((m.embedding_dim for m in module.modules() if isinstance(m, nn.Embedding)), default=0)


def _count(parameters: Any) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in parameters)


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else "no message"
