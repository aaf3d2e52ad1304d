"""Pretrained weights in: a Hugging Face checkpoint folder loaded straight into the model the backend builds.

Call `pretrained(path)` inside `configure_model`. The model is built the way the chosen backend builds models (on the
GPU, in host memory, partitioned by DeepSpeed, or on the meta device for the streaming plan) without its random
initialisation, and each weight is then read from the safetensors files into the place the backend keeps it, one
tensor at a time: loading needs no full copy of the model beside the one the plan holds.
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_offload._safetensors import Entry, Reader, read_folder

log = logging.getLogger(__name__)

# The attribute a meta parameter carries until the backend that materialises it reads its weights.
_SOURCE = "_lightning_offload_pretrained"


@dataclass
class WeightSource:
    """One parameter's weights in a checkpoint, read when the parameter gets memory."""

    entry: Entry
    reader: Reader = field(repr=False)

    def read_into(self, target: torch.Tensor) -> None:
        self.reader.read_into(self.entry, target)


@dataclass
class InitialSource:
    """A parameter that is in no checkpoint (a LoRA adapter), initialised by `initialise(tensor)` in fp32 when the
    parameter gets memory."""

    initialise: Any

    def read_into(self, target: torch.Tensor) -> None:
        value = torch.empty(target.shape, dtype=torch.float32, device="cpu")
        self.initialise(value)
        target.copy_(value)


def weight_source(param: torch.Tensor) -> WeightSource | InitialSource | None:
    """The checkpoint weights `pretrained` left on a meta parameter, for the backend that materialises it."""
    return getattr(param, _SOURCE, None)


def pretrained(path: str | os.PathLike, model_class: Any = None, *, dtype: torch.dtype | None = None,
               strict: bool = True, lora: Any = None, **model_kwargs: Any) -> nn.Module:
    """A `transformers` model with the weights of the checkpoint folder `path`, built for the backend that trains it.

    Args:
        path: a folder written by `save_pretrained` (`config.json` and `model.safetensors` or sharded safetensors
            with `model.safetensors.index.json`); nothing is downloaded.
        model_class: the `transformers` class to build (default `AutoModelForCausalLM`); anything with
            `from_config(config, dtype=...)`.
        dtype: the weights' dtype in the model; default: the Trainer's (fp32 for `"bf16-mixed"` and `"32-true"`,
            bf16 for `"bf16-true"`). The checkpoint's own dtype (bf16, fp16, fp32) is cast on the way.
        strict: raise when the model has parameters the checkpoint lacks, or the checkpoint tensors the model does
            not use; False warns, and leaves the missing parameters as the model initialises them.
        lora: a `peft.LoraConfig`: the model comes back as `peft.get_peft_model(model, lora)`, its pretrained
            weights frozen and only the adapters trainable (give the optimizer `p.requires_grad` parameters only).
        **model_kwargs: passed to `from_config` (e.g. `attn_implementation="sdpa"`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(path)
    entries = read_folder(folder)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    model_class = model_class or AutoModelForCausalLM
    dtype = dtype or torch.get_default_dtype()
    # With every weight in the checkpoint, the model's random initialisation would only be overwritten.
    with _no_init_weights() if strict else nullcontext():
        model = model_class.from_config(config, dtype=dtype, **model_kwargs)
        if hasattr(model, "tie_weights"):  # skipping the initialisation skips the tying too
            model.tie_weights()
    plan = _match(model, entries)
    plan.report(folder, strict)
    reader = Reader()
    for param, key in plan.params:
        _fill(param, WeightSource(entries[key], reader))
    for owner, name, key in plan.buffers:
        _fill(owner._buffers[name], WeightSource(entries[key], reader))
    if not plan.deferred:
        reader.close()
    if lora is not None:
        model = _with_lora(model, lora)
    log.info("Loaded %d tensors from %s%s", len(plan.params) + len(plan.buffers), folder,
             " (read as the backend materialises each unit)" if plan.deferred else "")
    return model


@dataclass
class _Match:
    params: list[tuple[nn.Parameter, str]]
    buffers: list[tuple[nn.Module, str, str]]
    missing: list[str]
    unexpected: list[str]
    deferred: bool

    def report(self, folder: Path, strict: bool) -> None:
        if not self.missing and not self.unexpected:
            return
        message = (f"The checkpoint {str(folder)!r} does not match the model: "
                   f"{len(self.missing)} parameter(s) missing from it {_few(self.missing)}, "
                   f"{len(self.unexpected)} tensor(s) the model does not have {_few(self.unexpected)}.")
        if strict:
            raise ValueError(f"{message} Pass the folder of a checkpoint of this architecture, or "
                             "`strict=False` to keep the missing parameters' initialisation and ignore the rest.")
        warnings.warn(f"{message} The missing parameters keep their initialisation.", stacklevel=3)


def _few(names: list[str]) -> str:
    return f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})" if names else ""


def _match(model: nn.Module, entries: dict[str, Entry]) -> _Match:
    """Pairs each parameter (once, under any of its tied names) and persistent buffer with a checkpoint key."""
    prefix = getattr(model, "base_model_prefix", "")

    def key_of(name: str) -> str | None:
        if name in entries:
            return name
        # A base model's checkpoint (no `model.` prefix) loads into the model with a head, and the reverse.
        if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in entries:
            return name[len(prefix) + 1:]
        if prefix and f"{prefix}.{name}" in entries:
            return f"{prefix}.{name}"
        return None

    names: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
        params[id(param)] = param
    matched, missing, used = [], [], set()
    for identity, aliases in names.items():
        keys = [key for key in map(key_of, aliases) if key is not None]
        if keys:
            matched.append((params[identity], keys[0]))
            used.update(keys)
        else:
            missing.append(aliases[0])
    buffers = []
    for module_name, module in model.named_modules():
        for name in module._buffers:
            if name in module._non_persistent_buffers_set or module._buffers[name] is None:
                continue
            key = key_of(f"{module_name}.{name}" if module_name else name)
            if key is not None:
                buffers.append((module, name, key))
                used.add(key)
    unexpected = sorted(set(entries) - used)
    deferred = any(param.is_meta for param, _ in matched)
    return _Match(matched, buffers, missing, unexpected, deferred)


def _fill(tensor: torch.Tensor, source: WeightSource) -> None:
    """Reads `source` into `tensor` where it lives; a meta tensor keeps the source for its backend."""
    if tuple(tensor.shape) != source.entry.shape and not hasattr(tensor, "ds_shape"):
        raise ValueError(f"A tensor of shape {tuple(tensor.shape)} in the model is {source.entry.shape} in the "
                         f"checkpoint {str(source.entry.file)!r}: the checkpoint is of another architecture.")
    if tensor.is_meta:
        setattr(tensor, _SOURCE, source)
    elif hasattr(tensor, "ds_id"):  # partitioned by DeepSpeed's zero.Init: gathered, written, partitioned again
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0), torch.no_grad():
            source.read_into(tensor.data)
    else:
        with torch.no_grad():
            source.read_into(tensor.data)


def _no_init_weights() -> Any:
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _with_lora(model: nn.Module, lora: Any) -> nn.Module:
    from peft import get_peft_model

    model = get_peft_model(model, lora)
    for name, param in model.named_parameters():
        if param.is_meta and "lora_" in name:
            # PEFT's own initialisation, run when the backend gives the adapter memory: A as a Linear's weight,
            # B zero, so the adapted model starts as the pretrained one.
            setattr(param, _SOURCE, InitialSource(_lora_a_init if "lora_A" in name else nn.init.zeros_))
    return model


def _lora_a_init(tensor: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(tensor, a=5**0.5)
