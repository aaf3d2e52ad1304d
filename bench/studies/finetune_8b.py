"""Fine-tuning at 8B and 19B: a pretrained checkpoint in with `lightning_offload.pretrained`, a Hugging Face folder
out.

    python -m bench.studies.finetune_8b create --folder /tmp/llama8b            # random init, bf16, save_pretrained
    python -m bench.studies.finetune_8b train --folder /tmp/llama8b --backend auto [--source random] [--save CKPT]
    python -m bench.studies.finetune_8b export --checkpoint CKPT --config /tmp/llama8b --out /tmp/llama8b-tuned
    python -m bench.studies.finetune_8b train --size 19b --folder /tmp/llama19b --backend stream --delete-source \
        --save CKPT                                                             # 19B: the disk holds one copy at a time

Each phase runs in a process of its own (`python -m bench call finetune_8b`, `finetune_19b_stream`), so each peak
host RSS is its own. `train` samples the process's RSS (and its anonymous part, which excludes page cache mapped from
files) every 10 ms while `configure_model` loads the weights, beside the planner's host-memory estimate of the chosen
plan, and times each optimizer step. Every phase prints one `RESULT {...}` line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader

import lightning_offload
from bench.models import SIZES, build_llama
from bench.runners import LlamaModule
from bench.studies.safetensors_reader import PeakRss, status_bytes

GIB = 2**30
# A CPU runs the phases with `--size tiny`, to check the script itself.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def drop_from_page_cache(folder: Path) -> None:
    """So the next read of these files comes from the disk, not from the memory the write left them in."""
    for file in folder.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())  # pages not yet written back would stay cached
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def create(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    model = build_llama(args.size, dtype=torch.bfloat16, device=DEVICE)
    built = time.perf_counter()
    model.save_pretrained(args.folder)
    saved = time.perf_counter()
    drop_from_page_cache(Path(args.folder))
    size = folder_bytes(Path(args.folder))
    return {"phase": "create", "gib": size / GIB, "build_s": built - started, "save_s": saved - built,
            "save_gb_s": size / 1e9 / (saved - built)}


class FineTune8B(LlamaModule):
    """The benchmark's 8B Llama, its weights from `folder` (or random, as the other rows), timed per step."""

    def __init__(self, size: str, folder: str, source: str) -> None:
        super().__init__(size, "by_strategy", "adamw")
        self.folder, self.source = folder, source
        self.load_s = self.setup_s = 0.0
        self.read_s: list[float] = [0.0]
        """`counting_read_seconds`'s running total, set by the caller."""
        self.load_read_s = 0.0
        """Seconds of it spent inside `configure_model`."""
        self.rss_before_load = 0
        self.peak: PeakRss | None = None
        # From `configure_model` to the first batch: where a backend that builds on the meta device (`stream`) reads
        # the weights, as it materialises each unit.
        self.setup_peak = PeakRss()
        self._setup_start = 0.0
        self.step_s: list[float] = []
        self._step_start = 0.0

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self._setup_start = time.perf_counter()
        self.setup_peak.__enter__()
        self.rss_before_load = status_bytes("VmRSS")
        with PeakRss() as peak:
            started, read_before = time.perf_counter(), self.read_s[0]
            if self.source == "pretrained":
                self.model = lightning_offload.pretrained(self.folder)
            else:
                super().configure_model()
            synchronize()
            self.load_s = time.perf_counter() - started
        self.load_read_s = self.read_s[0] - read_before
        self.peak = peak

    def on_train_start(self) -> None:
        synchronize()
        self.setup_s = time.perf_counter() - self._setup_start
        self.setup_peak.__exit__(None, None, None)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        synchronize()
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        synchronize()
        self.step_s.append(time.perf_counter() - self._step_start)


@contextmanager
def counting_read_seconds() -> Iterator[list[float]]:
    """Seconds spent reading checkpoint tensors into place, wherever the backend does it, summed inside the block."""
    from lightning_offload.pretrained import WeightSource

    total = [0.0]
    read_into = WeightSource.read_into

    def timed(self: WeightSource, target: torch.Tensor) -> None:
        started = time.perf_counter()
        read_into(self, target)
        total[0] += time.perf_counter() - started

    WeightSource.read_into = timed  # type: ignore[method-assign]
    try:
        yield total
    finally:
        WeightSource.read_into = read_into  # type: ignore[method-assign]


def train(args: argparse.Namespace) -> dict[str, Any]:
    vocab = SIZES[args.size].vocab
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (args.steps * args.micro_batch, args.seq + 1), generator=generator)
    module = FineTune8B(args.size, args.folder, args.source)
    strategy = lightning_offload.SingleGPUOffloadStrategy(backend=args.backend)
    trainer = L.Trainer(strategy=strategy, accelerator=DEVICE, devices=1, precision="bf16-mixed",
                        max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with counting_read_seconds() as read_s:
        module.read_s = read_s
        trainer.fit(module, DataLoader(tokens, batch_size=args.micro_batch))
    report = trainer.strategy.plan_report
    chosen = report.chosen if report is not None else None
    result = {
        "phase": "train", "backend": args.backend, "source": args.source,
        "plan": str(chosen.plan) if chosen else None,
        "plan_host_gib": chosen.memory.host_bytes / GIB if chosen else None,
        "plan_gpu_gib": chosen.memory.gpu_bytes / GIB if chosen else None,
        "load_s": module.load_s,
        "rss_before_load_gib": module.rss_before_load / GIB,
        "peak_rss_load_gib": module.peak.rss / GIB, "peak_anon_rss_load_gib": module.peak.anon / GIB,
        "setup_s": module.setup_s, "peak_rss_setup_gib": module.setup_peak.rss / GIB,
        "peak_anon_rss_setup_gib": module.setup_peak.anon / GIB, "read_s": read_s[0],
        # The first step compiles and warms the allocator: the median of the rest.
        "step_s": module.step_s, "median_step_s": statistics.median(module.step_s[1:]) if len(module.step_s) > 1
        else None,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / GIB if DEVICE == "cuda" else None,
    }
    if args.source == "pretrained":
        # Where the weights are read while the engine is set up (stream), `configure_model` itself reads nothing.
        result["load_gb_s"] = folder_bytes(Path(args.folder)) / 1e9 / module.load_s if module.load_read_s else None
        result["read_gb_s"] = folder_bytes(Path(args.folder)) / 1e9 / read_s[0] if read_s[0] else None
        result["setup_gb_s"] = folder_bytes(Path(args.folder)) / 1e9 / module.setup_s
    if args.delete_source:
        for file in Path(args.folder).glob("*.safetensors"):
            file.unlink()
    if args.save:
        started = time.perf_counter()
        trainer.save_checkpoint(args.save, weights_only=True)
        result["save_s"] = time.perf_counter() - started
    return result


def export(args: argparse.Namespace) -> dict[str, Any]:
    room = shutil.disk_usage(Path(args.out).parent).free
    if room < args.needs_free_gb * 1e9:
        return {"phase": "export", "skipped": f"{Path(args.out).parent} has {room / 1e9:.0f} GB free, under the "
                f"{args.needs_free_gb:g} GB the export needs"}
    rss_before = status_bytes("VmRSS")
    with PeakRss() as peak:
        started = time.perf_counter()
        out = lightning_offload.export_hf(args.checkpoint, args.out, config=args.config)
        seconds = time.perf_counter() - started
    size = folder_bytes(Path(out))
    result = {"phase": "export", "gib": size / GIB, "export_s": seconds, "written_gb_s": size / 1e9 / seconds,
              "peak_rss_gib": peak.rss / GIB, "peak_anon_rss_gib": peak.anon / GIB,
              "rss_before_gib": rss_before / GIB}
    if args.check:  # the exported files read back with safetensors' own reader
        from safetensors import safe_open

        index = Path(out) / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
            "model.safetensors"]
        with safe_open(Path(out) / files[0], "pt") as handle:
            name = next(iter(handle.keys()))
            tensor = handle.get_tensor(name)
            result["first_tensor"] = [name, list(tensor.shape), str(tensor.dtype)]
    if args.delete:
        shutil.rmtree(out)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    phases = parser.add_subparsers(dest="phase", required=True)
    create_args = phases.add_parser("create")
    create_args.add_argument("--folder", required=True)
    train_args = phases.add_parser("train")
    train_args.add_argument("--folder", required=True)
    train_args.add_argument("--backend", default="auto")
    train_args.add_argument("--source", choices=["pretrained", "random"], default="pretrained")
    train_args.add_argument("--steps", type=int, default=4)
    train_args.add_argument("--micro-batch", type=int, default=1)
    train_args.add_argument("--seq", type=int, default=2048)
    train_args.add_argument("--save", default=None,
                            help="save the trained weights here, without the optimizer state (`weights_only=True`)")
    train_args.add_argument("--delete-source", action="store_true",
                            help="delete the pretrained weights once trained, before saving (the config stays)")
    export_args = phases.add_parser("export")
    export_args.add_argument("--checkpoint", required=True)
    export_args.add_argument("--config", required=True)
    export_args.add_argument("--out", required=True)
    export_args.add_argument("--check", action="store_true")
    export_args.add_argument("--delete", action="store_true")
    export_args.add_argument("--needs-free-gb", type=float, default=0,
                             help="skip the export when the file system of --out has less room than this")
    for phase in (create_args, train_args):
        phase.add_argument("--size", choices=sorted(SIZES), default="8b")
    args = parser.parse_args(argv)
    result = {"create": create, "train": train, "export": export}[args.phase](args)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
