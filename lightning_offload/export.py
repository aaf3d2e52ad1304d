"""A Hugging Face model out: `export_hf(checkpoint, out_dir, config=...)` and `python -m lightning_offload.export`.

Reads any backend's checkpoint one tensor at a time (every format is memory-mapped) and writes sharded safetensors,
their index and the model's config: `AutoModelForCausalLM.from_pretrained(out_dir)` loads the result. Peak memory is
about one tensor, not the model. A module trained with LoRA adapters (`peft`) exports merged into its base weights,
or as the adapter alone (`adapter_only=True`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lightning_offload._safetensors import INDEX_FILE, SINGLE_FILE, write_file
from lightning_offload.backends import registry
from lightning_offload.saving import atomic_directory

if TYPE_CHECKING:
    from lightning_offload.backends.spec import SavedTensor

# Files of a pretrained folder that describe the model beside its weights, copied to the export.
_COMPANION_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def saved_tensors(checkpoint: str | os.PathLike) -> list[SavedTensor]:
    """The weights of any backend's checkpoint (an engine's folder, read by the backend that wrote it, or
    Lightning's file), memory-mapped."""
    from lightning_offload.backends.spec import grouped

    path = Path(checkpoint)
    if path.is_file():  # backends that keep whole weights on the device save Lightning's own file
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)["state_dict"]
        return grouped(state.items(), key=lambda t: (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape))
    return registry.checkpoint_spec(path).saved_weights(path)


def strip_prefix(names: list[str], expected: set[str]) -> str:
    """The prefix the training module adds to the model's names (`model.` for `self.model = AutoModel...`): the one
    that turns most saved names into names the model has."""
    votes = Counter(name[: len(name) - len(own)] for name in names for own in expected
                    if name.endswith(own) and (len(name) == len(own) or name[-len(own) - 1] == "."))
    if not votes:
        raise ValueError(f"None of the checkpoint's names (e.g. {names[:3]}) belongs to the model of this config: "
                         "pass the config of the model that was trained.")
    return votes.most_common(1)[0][0]


@dataclass
class _LoraPair:
    a: SavedTensor
    b: SavedTensor


def export_hf(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, config: Any,
              dtype: torch.dtype | str = torch.bfloat16, prefix: str | None = None,
              max_shard_bytes: int = 2 * 2**30, lora: Any = None, adapter_only: bool = False) -> Path:
    """Writes the model in `checkpoint` as a Hugging Face folder that `from_pretrained(out_dir)` loads.

    Args:
        checkpoint: any backend's checkpoint (the path given to `trainer.save_checkpoint` or from `ModelCheckpoint`).
        out_dir: the folder to write (replaced atomically: a crash leaves the previous one).
        config: the model's `transformers` config, or the folder of the pretrained checkpoint it started from
            (its tokenizer and generation config are copied along).
        dtype: the weights' dtype on disk: bf16 (default), fp16 or fp32.
        prefix: what the training module put before the model's names (`"model."` for `self.model`); None: found
            from the config's model.
        max_shard_bytes: the largest safetensors file; more makes `model-0000i-of-0000n.safetensors` shards.
        lora: the `peft.LoraConfig` the adapters were trained with (a module trained with `peft` saves
            `...base_layer.weight`, `...lora_A.<name>.weight`, `...lora_B.<name>.weight`): they are merged into the
            base weights, `W + B @ A * lora_alpha / r`, unless `adapter_only`.
        adapter_only: write the adapter alone (`adapter_model.safetensors` and `adapter_config.json`, loadable with
            `peft.PeftModel.from_pretrained(base_model, out_dir)`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    source_folder = None
    if isinstance(config, (str, os.PathLike)):
        source_folder = Path(config)
        config = AutoConfig.from_pretrained(source_folder, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    expected |= {name for name, _ in model.named_buffers()} & set(model.state_dict())
    # Tied names share one tensor: it is written once, under the name `save_pretrained` keeps.
    canonical = {name for name, _ in model.named_parameters()} | (expected - dict(model.named_parameters(
        remove_duplicate=False)).keys())
    saved = saved_tensors(checkpoint)
    tensors, pairs = _split_lora(saved)
    if pairs and lora is None:
        raise ValueError("The checkpoint holds LoRA adapters (`lora_A`/`lora_B` weights): pass `lora=` the "
                         "`peft.LoraConfig` they were trained with, to merge them or export them alone.")
    if prefix is None:
        prefix = strip_prefix([n for t in tensors for n in t.names], expected)
    if adapter_only:
        return _export_adapter(pairs, prefix, lora, dtype, Path(out_dir))
    layout: list[tuple[str, SavedTensor]] = []
    for saved_tensor in tensors:
        own = [n[len(prefix):] for n in saved_tensor.names if n.startswith(prefix) and n[len(prefix):] in expected]
        chosen = [n for n in own if n in canonical] or own
        if chosen:
            layout.append((chosen[0], saved_tensor))
    missing = canonical - {name for name, _ in layout}
    if missing:
        raise ValueError(f"The checkpoint lacks {len(missing)} weight(s) of the model {sorted(missing)[:5]} under the "
                         f"prefix {prefix!r}: pass the config of the model that was trained, or `prefix=`.")
    scaling = _lora_scaling(lora) if pairs else 0.0

    def load(name: str, saved_tensor: SavedTensor) -> torch.Tensor:
        weight = saved_tensor.load()
        pair = pairs.get(saved_tensor.names[0])
        if pair is not None:  # W + B A * scaling, in fp32 before the cast to the export dtype
            weight = weight.float() + (pair.b.load().float() @ pair.a.load().float()) * scaling
        return weight.to(_written_dtype(saved_tensor, dtype))

    config.dtype = dtype
    with atomic_directory(out_dir) as staging:
        _write_shards(staging, [(name, _written_dtype(s, dtype), s.shape, s) for name, s in layout], load,
                      max_shard_bytes)
        config.save_pretrained(staging)
        if source_folder is not None:
            for companion in _COMPANION_FILES:
                if (source_folder / companion).is_file():
                    shutil.copy2(source_folder / companion, staging / companion)
    return Path(out_dir)


def _written_dtype(saved: SavedTensor, dtype: torch.dtype) -> torch.dtype:
    """The export's `dtype` for a floating tensor; any other one (an integer counter, a bool mask) keeps its own."""
    return dtype if saved.dtype.is_floating_point else saved.dtype


def _split_lora(saved: list[SavedTensor]) -> tuple[list[SavedTensor], dict[str, _LoraPair]]:
    """The base tensors, named without PEFT's `base_layer.`, and each adapted weight's LoRA pair by its name."""
    adapters: dict[str, dict[str, SavedTensor]] = {}
    base = []
    for tensor in saved:
        part = next((p for p in (".lora_A.", ".lora_B.") if p in tensor.names[0]), None)
        if part is None:
            base.append(tensor)
        else:
            adapters.setdefault(tensor.names[0].partition(part)[0], {})[part[-2]] = tensor
    pairs = {}
    for tensor in base:
        layer, found, rest = tensor.names[0].partition(".base_layer.")
        if not found:
            continue
        tensor.names = [n.replace(".base_layer.", ".") for n in tensor.names]
        if rest == "weight" and layer in adapters:
            pairs[tensor.names[0]] = _LoraPair(adapters[layer]["A"], adapters[layer]["B"])
    return base, pairs


def _lora_scaling(lora: Any) -> float:
    rank, alpha = lora.r, lora.lora_alpha
    return alpha / rank**0.5 if getattr(lora, "use_rslora", False) else alpha / rank


def _export_adapter(pairs: dict[str, _LoraPair], prefix: str, lora: Any, dtype: torch.dtype, out_dir: Path) -> Path:
    layout = []
    for name, pair in pairs.items():
        layer = name[len(prefix):].removesuffix(".weight")
        # PEFT's own naming on disk: the adapter's name is dropped, `base_model.model.` kept.
        layout.append((f"base_model.model.{layer}.lora_A.weight", pair.a.shape, pair.a))
        layout.append((f"base_model.model.{layer}.lora_B.weight", pair.b.shape, pair.b))
    with atomic_directory(out_dir) as staging:
        write_file(staging / "adapter_model.safetensors", [(n, dtype, s) for n, s, _ in layout],
                   (saved.load().to(dtype) for _, _, saved in layout), metadata={"format": "pt"})
        lora.save_pretrained(staging)
    return out_dir


def _write_shards(staging: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...], SavedTensor]],
                  load: Callable[[str, SavedTensor], torch.Tensor], max_shard_bytes: int) -> None:
    """Writes each (name, dtype, shape, saved tensor) of `layout`, `load`ed in that dtype, into shards of at most
    `max_shard_bytes`."""
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...], SavedTensor]]] = [[]]
    filled = 0
    for entry in layout:
        size = torch.Size(entry[2]).numel() * entry[1].itemsize
        if shards[-1] and filled + size > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(entry)
        filled += size
    files = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for file, shard in zip(files, shards):
        write_file(staging / file, [(name, dtype, shape) for name, dtype, shape, _ in shard],
                   (load(name, saved) for name, _, _, saved in shard), metadata={"format": "pt"})
        weight_map.update({name: file for name, _, _, _ in shard})
    if len(shards) > 1:
        total = sum(torch.Size(shape).numel() * dtype.itemsize for _, dtype, shape, _ in layout)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (staging / INDEX_FILE).write_text(json.dumps(index, indent=2))


def main(argv: list[str] | None = None, prog: str = "python -m lightning_offload.export") -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint of any backend (file or folder)")
    parser.add_argument("out_dir", help="the Hugging Face folder to write")
    parser.add_argument("--config", required=True, help="the pretrained folder the model started from, or a "
                                                        "folder with its config.json")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    parser.add_argument("--prefix", default=None, help="the training module's prefix of the model's names")
    parser.add_argument("--max-shard-gib", type=float, default=2.0)
    args = parser.parse_args(argv)
    out = export_hf(args.checkpoint, args.out_dir, config=args.config, dtype=args.dtype, prefix=args.prefix,
                    max_shard_bytes=int(args.max_shard_gib * 2**30))
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
