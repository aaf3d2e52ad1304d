"""Compiling the repeated blocks: `SingleGPUOffloadStrategy(compile_blocks=True)`.

Why: in an eager `transformers` decoder layer the elementwise work around the GEMMs (RMSNorm in fp32, rotary
embeddings, SiLU x up, residual adds, dtype casts) is a string of memory-bound kernels, which Inductor fuses
(bench/RESULTS.md, "Compiled blocks"). Lightning compiles a whole LightningModule or nothing; compiling the whole model breaks at every engine hook, so the strategy compiles each block instead.

Only the block's inner `forward` is compiled, not its `__call__`: module hooks (the engines' prefetch and gather
hooks, the checkpointing wrappers, the parameters' post-accumulate-grad hooks that step the in-backward optimizers)
stay outside the graph, and every block shares one compiled graph because parameters are graph inputs.

Inductor compiles with a pool of worker processes (one per core, up to 32), each a Python process with torch
imported: several GiB of host RSS on a many-core machine, for as long as the run. The plans that compile blocks
are the ones short of host memory, and one small graph compiles in seconds without the pool, so unless the user
set `TORCHINDUCTOR_COMPILE_THREADS`, compiling blocks compiles in this process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from lightning_offload.backends import registry
from lightning_offload.activation_checkpointing import find_blocks

_COMPILED = "_lightning_offload_compiled"


def compile_blocks(model: nn.Module, class_names: Sequence[str] = ()) -> int:
    """Replaces the `forward` of each block of `model` (`find_blocks`) with its compiled version, in
    place (parameter names and checkpoints do not change); returns how many blocks were compiled."""
    blocks = find_blocks(model, class_names)
    if not blocks:
        raise ValueError(
            f"`compile_blocks=True` found no repeated block in {type(model).__name__} to compile. Name the block "
            "class with `activation_checkpointing={'policy': ..., 'module_classes': ['MyDecoderLayer']}`, or "
            "compile the model yourself and leave `compile_blocks` off."
        )
    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        from torch._inductor import config as inductor_config

        inductor_config.compile_threads = 1
    for block in blocks:
        if not getattr(block, _COMPILED, False):
            block.forward = torch.compile(block.forward)
            setattr(block, _COMPILED, True)
    return len(blocks)


def is_compiled(module: nn.Module) -> bool:
    return bool(getattr(module, _COMPILED, False))


def refuse_compiled_submodules(module: nn.Module, backend: str, reason: str) -> None:
    """Refuses a module the user compiled (`torch.compile(layer)`) for a backend that hooks the layers inside it:
    hooks registered after compiling never run in the compiled graph."""
    from torch._dynamo.eval_frame import OptimizedModule

    compiled = [name for name, submodule in module.named_modules() if isinstance(submodule, OptimizedModule)]
    if compiled:
        running = " or ".join(f"`backend={name!r}`" for name in registry.available_backends()
                              if registry.spec(name).runs_compiled_modules)
        raise ValueError(
            f"`{compiled[0] or type(module).__name__}` is compiled with `torch.compile`, which hides its layers from "
            f"the hooks in which the `{backend}` backend {reason}. Leave the module uncompiled (the strategy's "
            f"`compile_blocks=True` compiles blocks where the backend allows it), or pick {running}, which run "
            "compiled modules."
        )
