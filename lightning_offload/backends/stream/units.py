"""Units: the pieces of the model that move together, and building their weights without a full host copy.

Each repeated block (`find_blocks`) is a unit; every module outside the blocks that owns parameters
(embedding, final norm, output layer) is a unit of its own, except that modules sharing a parameter (a tied
embedding and output layer) form one unit. Units are ordered by where their modules are registered, which is the
order a forward pass runs them in for the usual models; it is the order weights are prefetched in, so a model that
runs them otherwise is still correct, only slower.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_offload.activation_checkpointing import find_blocks
from lightning_offload.backends.stream.lanes import aligned
from lightning_offload.backends.stream.parameters_on_meta import InitRecord, init_record
from lightning_offload.kernels.format import RECORD_BYTES
from lightning_offload.pretrained import InitialSource, WeightSource, weight_source


@dataclass(eq=False)
class Unit:
    index: int
    name: str
    modules: list[nn.Module]
    params: list[nn.Parameter]
    names: list[list[str]]
    """Every name of each parameter in the root module (several for tied weights)."""
    is_block: bool
    streamed: bool = False
    offsets: list[int] = field(default_factory=list)
    """Byte offset of each parameter in the unit's weight region (host arena piece or GPU slot)."""
    weight_bytes: int = 0
    host_weights: torch.Tensor | None = None
    buckets: list[Any] = field(default_factory=list)
    """`optimizer.GroupBucket`s: the unit's parameters of each param group and their 8-bit AdamW state."""
    state_offsets: list[int] = field(default_factory=list)
    state_bytes: int = 0
    host_state: torch.Tensor | None = None
    """Its 8-bit state in the host arena; None when it has none, or when it lives on disk (`on_disk`)."""
    on_disk: bool = False
    host_gradients: torch.Tensor | None = None
    """Accumulating, a streamed unit's gradients summed over the micro-batches so far, laid out as its weights, in
    the host arena: its GPU gradients go there after each micro-batch that does not step."""
    trainable: int = 0
    """Parameters that expect a gradient: the unit's update runs once that many have arrived."""

    def lay_out(self, dtype: torch.dtype) -> None:
        element = torch.empty(0, dtype=dtype).element_size()
        self.offsets, total = [], 0
        for param in self.params:
            self.offsets.append(total)
            total += aligned(param.numel() * element)
        self.weight_bytes = total

    def views(self, region: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        """The unit's parameters as typed views into `region` (uint8, laid out by `lay_out`)."""
        element = torch.empty(0, dtype=dtype).element_size()
        return [region[offset:offset + p.numel() * element].view(dtype).view(p.shape)
                for p, offset in zip(self.params, self.offsets)]

    def state_views(self, region: torch.Tensor) -> list[torch.Tensor]:
        return [region[offset:offset + entry.bucket.num_blocks * RECORD_BYTES]
                for offset, entry in zip(self.state_offsets, self.buckets)]


def find_units(root: nn.Module, block_classes: list[str] | tuple[str, ...] = ()) -> list[Unit]:
    blocks = find_blocks(root, block_classes)
    if not blocks:
        raise ValueError(
            f"The `stream` backend moves a model block by block, but no repeated block was found in "
            f"{type(root).__name__}. Name the block class with `block_classes=['MyDecoderLayer']`."
        )
    position = {id(m): i for i, m in enumerate(root.modules())}
    module_names = {id(m): name for name, m in root.named_modules(remove_duplicate=False)}
    names_of: dict[int, list[str]] = defaultdict(list)
    for name, param in root.named_parameters(remove_duplicate=False):
        names_of[id(param)].append(name)
    inside_blocks = {id(m) for block in blocks for m in block.modules()}
    block_of: dict[int, nn.Module] = {}
    for block in blocks:
        for param in block.parameters():
            other = block_of.setdefault(id(param), block)
            if other is not block:
                raise ValueError(
                    f"Blocks {module_names[id(other)]!r} and {module_names[id(block)]!r} share the parameter "
                    f"{' = '.join(names_of[id(param)])}: the `stream` backend moves each block separately and cannot "
                    "tie a weight across blocks. Give each block its own weight, or train this model with another "
                    "backend (`backend='fsdp'` shards the blocks that share it together)."
                )
    block_params = set(block_of)

    groups: list[tuple[list[nn.Module], list[nn.Parameter]]] = []
    owner: dict[int, int] = {}
    for module in root.modules():
        if id(module) in inside_blocks:
            continue
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        shared = [p for p in own if id(p) in block_params]
        if shared:
            raise ValueError(
                f"Module {module_names[id(module)]!r} shares a parameter with a block ({names_of[id(shared[0])]}); "
                "the `stream` backend moves blocks separately and cannot tie weights across them. Give each its own "
                "weight, or train this model with another backend (`backend='fsdp'`)."
            )
        target = next((owner[id(p)] for p in own if id(p) in owner), None)
        if target is None:
            groups.append(([], []))
            target = len(groups) - 1
        groups[target][0].append(module)
        for p in own:
            if id(p) not in owner:
                owner[id(p)] = target
                groups[target][1].append(p)

    units = [Unit(0, module_names[id(block)], [block], _unique(block.parameters()), [], True) for block in blocks]
    units += [Unit(0, "+".join(module_names[id(m)] for m in modules), modules, params, [], False)
              for modules, params in groups]
    units.sort(key=lambda unit: min(position[id(m)] for m in unit.modules))
    for index, unit in enumerate(units):
        unit.index = index
        unit.names = [names_of[id(p)] for p in unit.params]
    return units


def _unique(params: object) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in params:  # type: ignore[attr-defined]
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def replace_parameters(root: nn.Module, new: dict[int, nn.Parameter]) -> None:
    """Puts `new[id(old)]` wherever `old` is registered (every module of a tied weight)."""
    for module in root.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and id(param) in new:
                module._parameters[name] = new[id(param)]


def initialiser(module: nn.Module, root: nn.Module) -> object | None:
    """What re-initialises `module` after it was built on the meta device: the `_init_weights` of the
    `transformers` model holding it (which also recomputes rotary buffers), else its own `reset_parameters`."""
    for ancestor in root.modules():
        init_weights = getattr(ancestor, "_init_weights", None)
        if callable(init_weights) and hasattr(ancestor, "config") and any(m is module for m in ancestor.modules()):
            return lambda: init_weights(module)
    reset = getattr(module, "reset_parameters", None)
    return reset if callable(reset) else None


def initial_weights(param: torch.Tensor) -> WeightSource | InitialSource | InitRecord | None:
    """Where a meta parameter's weights come from: a checkpoint (`lightning_offload.pretrained`), else the record of
    its build; None: its module's initialiser."""
    return weight_source(param) or init_record(param)


def check_meta_initialisable(root: nn.Module) -> None:
    """Refuses, before anything is allocated, a meta-built module that nothing knows how to initialise."""
    names = {id(m): name for name, m in root.named_modules()}
    for module in root.modules():
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if any(t.is_meta and initial_weights(t) is None for t in own) and initialiser(module, root) is None:
            raise ValueError(
                f"`{names[id(module)]}` ({type(module).__name__}) was built on the meta device by the `stream` "
                "backend but has no `reset_parameters()` to initialise it. Add one, or build the model in host "
                "memory with `build_on_meta=False`."
            )


def initialise(module: nn.Module, root: nn.Module, device: torch.device) -> None:
    """Runs `module`'s initialiser on its parameters and its meta buffers together, as its constructor would: the meta
    buffers are made on `device` first, and a persistent one `lightning_offload.pretrained` found in a checkpoint (a
    step counter) is read after, as the initialiser would overwrite it. The buffers its constructor computed keep
    their values (a checkpoint's too), as under `strategy="auto"`."""
    sources = {name: weight_source(b) for name, b in module._buffers.items() if b is not None and b.is_meta}
    for name in sources:
        module._buffers[name] = torch.empty_like(module._buffers[name], device=device)
    computed = [(name, b, b.clone()) for name, b in module._buffers.items() if b is not None and name not in sources]
    init = initialiser(module, root)
    assert init is not None  # check_meta_initialisable ran first
    init()  # type: ignore[operator]
    with torch.no_grad():
        for name, source in sources.items():
            if source is not None:
                source.read_into(module._buffers[name])
        for name, buffer, value in computed:
            module._buffers[name] = buffer
            buffer.copy_(value)


def materialise_buffers(root: nn.Module, device: torch.device) -> None:
    """The buffers the build left on meta (computed from parameters' weights) once every parameter has its weights:
    replayed from the build's record, else (computed from a parameter whose weights were loaded) made on `device` and
    computed by their module's initialiser, which must neither overwrite the module's weights nor draw from the
    user's random generators."""
    for module in root.modules():
        for name, buffer in module._buffers.items():
            record = init_record(buffer) if buffer is not None and buffer.is_meta else None
            if record is not None:
                module._buffers[name] = torch.empty_like(buffer, device=device)
                record.read_into(module._buffers[name])
        if any(b is not None and b.is_meta for b in module._buffers.values()):
            with _weights_and_random_state_kept(module, device):
                initialise(module, root, device)


@contextmanager
def _weights_and_random_state_kept(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Puts back `module`'s own parameters, and the random generators' states, as they were before the block."""
    kept = [(name, param, param.detach().clone()) for name, param in module._parameters.items() if param is not None]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
    with torch.no_grad():
        for name, param, value in kept:
            module._parameters[name] = param
            param.copy_(value)
