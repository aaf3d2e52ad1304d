"""What the memory and cost models need to know of a model, measured by one forward pass on the meta device.

A meta forward allocates nothing, yet autograd records every tensor it would save for backward at the real shapes,
so activation bytes per block are measured, not guessed: seconds even for a 40B model. A LightningModule is measured
in place: its parameters are swapped for meta twins for the duration (or, when it builds its network in
`configure_model`, the hook runs once on the meta device and is undone), so nothing is copied or allocated.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_offload.activation_checkpointing import find_blocks, recompute_suspended
from lightning_offload.losses import ChunkedLMHeadLoss


@dataclass(frozen=True, kw_only=True)
class ModelStats:
    """What the memory model needs to know of a model at one batch shape."""

    parameters: int
    block_parameters: int
    """Parameters of one repeated block (the decoder layer)."""
    blocks: int
    activation_bytes_per_block: int
    """Bytes one block saves for backward without checkpointing, at the measured batch shape and dtype."""
    block_input_bytes: int
    """Bytes of one block's input: what a checkpointed block keeps."""
    logits: int
    """Elements of the output logits (batch x sequence x vocabulary); 0 when the loss never materialises them."""
    loss_workspace_bytes: int = 0
    """Bytes a loss that never materialises the logits allocates at its peak in forward (one slice of them)."""
    embedding_parameters: int = 0
    """Parameters of embedding tables: excluded from the 6 x N x tokens FLOP count."""
    tokens: int = 0
    """Tokens per micro-batch (0: unknown, the cost model cannot estimate compute)."""
    outside_block_activation_bytes: int = 0
    """Bytes saved for backward outside the blocks (embedding output, final norm, output layer, loss)."""
    width: int = 0
    """Features per token of a block's input (the hidden size): narrow blocks reach less of the matmul rate."""
    compiled_blocks: bool = False
    """The blocks' forward runs under `torch.compile` (the strategy's `compile_blocks`): shorter compute."""
    frozen_parameters: int = 0
    """Parameters that take no gradient (`requires_grad=False`: a frozen trunk, a LoRA model's base weights): their
    weights count, their gradients and optimizer state do not."""
    frozen_block_parameters: int = 0
    """Frozen parameters of one repeated block."""
    frozen_embedding_parameters: int = 0
    """Frozen parameters of embedding tables."""
    precision: str = "bf16-mixed"
    """The Trainer's precision: activations are measured in its compute dtype, and engines keep their weights by it."""
    built_at_setup: bool = False
    """The module builds its network in `configure_model`, which runs inside the engine's build context (on the GPU
    for the engines that train there); False: it was built before (in `__init__`, in host memory)."""

    @property
    def other_parameters(self) -> int:
        """Embeddings, final norm and output layer: outside the blocks."""
        return self.parameters - self.blocks * self.block_parameters

    @property
    def trainable_parameters(self) -> int:
        """Parameters that take gradients and optimizer state."""
        return self.parameters - self.frozen_parameters

    @property
    def trainable_block_parameters(self) -> int:
        return self.block_parameters - self.frozen_block_parameters

    @property
    def trainable_embedding_parameters(self) -> int:
        return self.embedding_parameters - self.frozen_embedding_parameters

    @property
    def compute_parameters(self) -> int:
        """N of the 6 x N x tokens FLOP count: every parameter except embedding tables."""
        return self.parameters - self.embedding_parameters


class _FusedAttentionSaves(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention on the meta device, saving what the fused kernels save.

    On meta tensors SDPA decomposes into the math path, which saves the full attention matrix (B x H x S x S);
    the flash and memory-efficient kernels used on GPUs (and the CPU's flash kernel) save only q, k, v, the output
    and an fp32 log-sum-exp per query.
    """

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        output = torch.empty_like(query)
        ctx.save_for_backward(query, key, value, output, query.new_empty(query.shape[:-1], dtype=torch.float32))
        return output

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> None:
        raise RuntimeError("Only the forward pass is measured.")


def _fused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any,
                     **kwargs: Any) -> torch.Tensor:
    return _FusedAttentionSaves.apply(query, key, value)


def measure_model(model: nn.Module, example_input: Any, *, dtype: torch.dtype | None = torch.bfloat16,
                  forward: Callable[[nn.Module, Any], Any] | None = None) -> ModelStats:
    """Measures `model` on `example_input` (meta tensors of the real batch shape, or real tensors).

    Saved tensors are counted per block by hooks that know which block is running; `dtype` is the compute dtype
    the parameters are cast to first (bf16 for the mixed-precision plans; None keeps them). `forward` runs the
    step to measure (default `model(example_input)`); its output may be logits, an object with `.logits`, or a loss.
    """
    model = model.to(dtype=dtype) if dtype is not None else model
    # A model without a repeated block is measured whole: everything it saves counts as outside the blocks.
    blocks = find_blocks(model)
    running: list[int] = []
    saved_per_block = [0] * len(blocks)
    saved_outside = [0]
    block_inputs = [0] * len(blocks)
    logits = [0]
    loss_workspace = [0]
    width = [0]

    def enter(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            running.append(index)
            first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            block_inputs[index] = 0 if first is None else first.numel() * first.element_size()
            width[0] = 0 if first is None else first.shape[-1]
        return hook

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        running.pop()

    parameter_ids = {id(p) for p in model.parameters()}
    output_layers = _output_layers(model, blocks)

    def count_logits(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.ndim >= 2:
            logits[0] = max(logits[0], output.numel())
        elif isinstance(module, ChunkedLMHeadLoss):  # fused with its loss: a scalar, no logits exist
            hidden = args[0] if args else kwargs["hidden"]
            tokens = hidden.numel() // hidden.shape[-1]
            loss_workspace[0] = max(loss_workspace[0], module.workspace_bytes(tokens))

    held: set[int] = set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        # Layers save their weights (or transposed views of them) for backward: memory the weights take anyway.
        # Memory is held per storage, once: q, k and v projections (or gate and up) save the same input, and
        # attention saves three views of one projection output. Packed tensors stay alive, so ids stay unique.
        base = tensor._base if tensor._base is not None else tensor
        if id(base) not in parameter_ids and id(base) not in held:
            held.add(id(base))
            size = base.numel() * base.element_size()
            if running:
                saved_per_block[running[-1]] += size
            else:
                saved_outside[0] += size
        return tensor

    handles = [layer.register_forward_hook(count_logits, with_kwargs=True) for layer in output_layers]
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(enter(index), with_kwargs=True))
        handles.append(block.register_forward_hook(leave))
    try:
        # Blocks that checkpoint themselves are measured as if they did not: the plan's policy counts what they keep
        # (their inputs) and the one block recomputed at a time. Measured through the checkpoint, a block's saved
        # tensors would be its input alone, or none when transformers checkpoints around the block's hooks
        # (`GradientCheckpointingLayer.__call__` before 5.2x), its input then counted outside the blocks as well.
        with _meta_stand_ins(_is_meta(example_input)), recompute_suspended(blocks), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            forward(model, example_input) if forward else model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    embeddings = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    return ModelStats(
        parameters=_count(model.parameters()),
        block_parameters=_count(blocks[0].parameters()) if blocks else 0,
        frozen_parameters=_count(p for p in model.parameters() if not p.requires_grad),
        frozen_block_parameters=_count(p for p in blocks[0].parameters() if not p.requires_grad) if blocks else 0,
        blocks=len(blocks),
        activation_bytes_per_block=max(saved_per_block, default=0),
        block_input_bytes=max(block_inputs, default=0),
        logits=logits[0],
        loss_workspace_bytes=loss_workspace[0],
        embedding_parameters=_count(embeddings),
        frozen_embedding_parameters=_count(p for p in embeddings if not p.requires_grad),
        tokens=_tokens(example_input),
        outside_block_activation_bytes=saved_outside[0],
        width=width[0],
    )


class _AutocastAcceptingMeta(torch.autocast):
    """`torch.autocast(device_type="meta", ...)`, which torch refuses ("unsupported scalarType"), as the CPU's:
    transformers before 5 turns autocast off that way around its rotary embedding, on the input's device type."""

    def __init__(self, device_type: str, *args: Any, **kwargs: Any) -> None:
        super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)


@contextmanager
def _meta_stand_ins(on_meta: bool) -> Generator[None, None, None]:
    """Replaces what cannot run on meta tensors with what the real run does, for the duration of a measurement."""
    if not on_meta:
        yield
        return
    attention = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _fused_attention
    autocast = torch.autocast
    torch.autocast = _AutocastAcceptingMeta
    # transformers inspects position ids' values to detect packed sequences, which meta tensors do not have; a
    # measured batch is one unpacked sequence per row.
    masking = sys.modules.get("transformers.masking_utils")
    find_packed = getattr(masking, "find_packed_sequence_indices", None)
    if find_packed is not None:
        masking.find_packed_sequence_indices = lambda *args, **kwargs: None
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = attention
        torch.autocast = autocast
        if find_packed is not None:
            masking.find_packed_sequence_indices = find_packed


def measure_module(module: nn.Module, batch: Any, *, dtype: torch.dtype,
                   step: Callable[[Any], Any] | None = None) -> ModelStats:
    """Measures a module in place at the shapes of `batch`, without allocating: see the module docstring.

    `step(meta_batch)` runs what training runs (e.g. a LightningModule's `training_step`); when it cannot run on
    meta tensors (it calls `.item()`, say), `module(first tensor of the batch)` is measured instead.
    """
    from lightning_offload.planner.preflight import module_state_kept

    meta_batch = _to_meta(batch)
    # A forward may cache tensors in plain attributes (a lazily built positional table): on the meta device here.
    with module_state_kept(module), meta_network(module, dtype), _silenced_logging(module):
        step_error: Exception | None = None
        if step is not None:
            try:
                return measure_model(module, meta_batch, dtype=None, forward=lambda _, b: step(b))
            except (NotImplementedError, RuntimeError, TypeError, ValueError, AttributeError) as error:
                step_error = error
        first = meta_batch if isinstance(meta_batch, torch.Tensor) else next(_tensors(meta_batch), None)
        if first is None:
            raise ValueError(f"The batch ({type(batch).__name__}) holds no tensor to measure the model with.")
        try:
            return measure_model(module, first, dtype=None)
        except Exception as error:
            # The training step's failure says more than the fallback's (a module without `forward`, say).
            raise (step_error or error) from error


@contextmanager
def meta_network(module: nn.Module, dtype: torch.dtype) -> Generator[None, None, None]:
    """`module` with meta parameters of `dtype` for the duration: its own swapped for meta twins, or, when it has
    none yet and builds them in `configure_model`, built on the meta device and undone afterwards."""
    if not any(True for _ in module.parameters()) and hasattr(module, "configure_model"):
        # `configure_model` fills the module's own tables in place: keep copies of them, not references.
        saved = dict(module.__dict__)
        tables = {key: dict(module.__dict__[key]) for key in ("_modules", "_parameters", "_buffers")}
        try:
            with torch.device("meta"):
                module.configure_model()
            module.to(dtype=dtype)
            yield
        finally:
            module.__dict__.clear()
            module.__dict__.update(saved, **tables)
        return
    originals: list[tuple[nn.Module, str, str, torch.Tensor]] = []
    twins: dict[int, torch.Tensor] = {}
    for submodule in module.modules():
        for kind in ("_parameters", "_buffers"):
            table = getattr(submodule, kind)
            for name, tensor in table.items():
                if tensor is None:
                    continue
                if id(tensor) not in twins:
                    twin = torch.empty_like(tensor, device="meta",
                                            dtype=dtype if tensor.is_floating_point() else tensor.dtype)
                    twins[id(tensor)] = nn.Parameter(twin, tensor.requires_grad) if kind == "_parameters" else twin
                originals.append((submodule, kind, name, tensor))
                table[name] = twins[id(tensor)]
    try:
        yield
    finally:
        for submodule, kind, name, tensor in originals:
            getattr(submodule, kind)[name] = tensor


@contextmanager
def _silenced_logging(module: nn.Module) -> Generator[None, None, None]:
    # A LightningModule's `self.log` would record meta tensors as metrics of the run.
    silenced = [name for name in ("log", "log_dict") if hasattr(module, name)]
    for name in silenced:
        setattr(module, name, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        for name in silenced:
            module.__dict__.pop(name, None)


def _output_layers(model: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    """The layers whose output is the logits: Linears outside the blocks as wide as an embedding table."""
    vocabularies = {m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)}
    inside = {id(m) for block in blocks for m in block.modules()}
    return [m for m in model.modules()
            if isinstance(m, nn.Linear) and m.out_features in vocabularies and id(m) not in inside]


def _count(parameters: Iterator[torch.Tensor]) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in parameters)


def _tensors(batch: Any) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, dict):
        for value in batch.values():
            yield from _tensors(value)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            yield from _tensors(value)


def _is_meta(batch: Any) -> bool:
    return any(t.is_meta for t in _tensors(batch))


def _tokens(batch: Any) -> int:
    first = next(_tensors(batch), None)
    return first.numel() if first is not None and not first.is_floating_point() else 0


def _to_meta(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to("meta")
    if isinstance(batch, dict):
        return type(batch)((key, _to_meta(value)) for key, value in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_to_meta(value) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_meta(value) for value in batch)
    return batch
