"""Fine-tuning at 8B: a pretrained checkpoint in with `lightning_offload.pretrained`, a Hugging Face folder out.

    python -m bench.studies.finetune_8b create --folder /tmp/llama8b            # random init, bf16, save_pretrained
    python -m bench.studies.finetune_8b train --folder /tmp/llama8b --backend auto [--source random] [--save CKPT]
    python -m bench.studies.finetune_8b export --checkpoint CKPT --config /tmp/llama8b --out /tmp/llama8b-tuned

Each phase runs in a process of its own (`python -m bench call finetune_8b`), so each peak host RSS is its own. `train`
samples the process's RSS (and its anonymous part, which excludes page cache mapped from files) every 20 ms while
`configure_model` loads the weights, beside the planner's host-memory estimate of the chosen plan, and times each
optimizer step. Every phase prints one `RESULT {...}` line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader

import lightning_offload
from bench.models import SIZES
from bench.runners import LlamaModule

GIB = 2**30
# A CPU runs the phases with `--size tiny`, to check the script itself.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """The largest VmRSS and RssAnon of this process while the `with` block runs, sampled every 20 ms."""

    def __init__(self) -> None:
        self.rss = self.anon = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.rss = max(self.rss, _status_bytes("VmRSS"))
            self.anon = max(self.anon, _status_bytes("RssAnon"))
            self._stop.wait(0.02)

    def __enter__(self) -> PeakRss:
        self.before = _status_bytes("VmRSS")
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.rss = max(self.rss, _status_bytes("VmRSS"))
        self.anon = max(self.anon, _status_bytes("RssAnon"))


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def drop_from_page_cache(folder: Path) -> None:
    """So the next read of these files comes from the disk, not from the memory the write left them in."""
    for file in folder.iterdir():
        with open(file, "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def create(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import LlamaForCausalLM

    started = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(SIZES[args.size].llama_config())
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
        self.load_s = 0.0
        self.peak: PeakRss | None = None
        self.step_s: list[float] = []
        self._step_start = 0.0

    def configure_model(self) -> None:
        if self.model is not None:
            return
        with PeakRss() as peak:
            started = time.perf_counter()
            if self.source == "pretrained":
                self.model = lightning_offload.pretrained(self.folder)
            else:
                super().configure_model()
            synchronize()
            self.load_s = time.perf_counter() - started
        self.peak = peak

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        synchronize()
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        synchronize()
        self.step_s.append(time.perf_counter() - self._step_start)


def train(args: argparse.Namespace) -> dict[str, Any]:
    vocab = SIZES[args.size].vocab
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (args.steps * args.micro_batch, args.seq + 1), generator=generator)
    module = FineTune8B(args.size, args.folder, args.source)
    strategy = lightning_offload.SingleGPUOffloadStrategy(backend=args.backend)
    trainer = L.Trainer(strategy=strategy, accelerator=DEVICE, devices=1, precision="bf16-mixed",
                        max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, DataLoader(tokens, batch_size=args.micro_batch))
    report = trainer.strategy.plan_report
    chosen = report.chosen if report is not None else None
    result = {
        "phase": "train", "backend": args.backend, "source": args.source,
        "plan": str(chosen.plan) if chosen else None,
        "plan_host_gib": chosen.memory.host_bytes / GIB if chosen else None,
        "plan_gpu_gib": chosen.memory.gpu_bytes / GIB if chosen else None,
        "load_s": module.load_s,
        "rss_before_load_gib": module.peak.before / GIB,
        "peak_rss_load_gib": module.peak.rss / GIB, "peak_anon_rss_load_gib": module.peak.anon / GIB,
        # The first step compiles and warms the allocator: the median of the rest.
        "step_s": module.step_s, "median_step_s": statistics.median(module.step_s[1:]) if len(module.step_s) > 1
        else None,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / GIB if DEVICE == "cuda" else None,
    }
    if args.source == "pretrained":
        result["load_gb_s"] = folder_bytes(Path(args.folder)) / 1e9 / module.load_s
    if args.save:
        started = time.perf_counter()
        trainer.save_checkpoint(args.save, weights_only=True)
        result["save_s"] = time.perf_counter() - started
    return result


def export(args: argparse.Namespace) -> dict[str, Any]:
    with PeakRss() as peak:
        started = time.perf_counter()
        out = lightning_offload.export_hf(args.checkpoint, args.out, config=args.config)
        seconds = time.perf_counter() - started
    size = folder_bytes(Path(out))
    result = {"phase": "export", "gib": size / GIB, "export_s": seconds, "written_gb_s": size / 1e9 / seconds,
              "peak_rss_gib": peak.rss / GIB, "peak_anon_rss_gib": peak.anon / GIB,
              "rss_before_gib": peak.before / GIB}
    if args.check:  # the exported files read back with safetensors' own reader
        from safetensors import safe_open

        index = Path(out) / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
            "model.safetensors"]
        with safe_open(Path(out) / files[0], "pt") as handle:
            name = next(iter(handle.keys()))
            result["first_tensor"] = [name, list(handle.get_tensor(name).shape), str(handle.get_tensor(name).dtype)]
    if args.delete:
        shutil.rmtree(out)
    return result


def main() -> None:
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
    train_args.add_argument("--save", default=None, help="save the trained weights here (Lightning's weights_only)")
    export_args = phases.add_parser("export")
    export_args.add_argument("--checkpoint", required=True)
    export_args.add_argument("--config", required=True)
    export_args.add_argument("--out", required=True)
    export_args.add_argument("--check", action="store_true")
    export_args.add_argument("--delete", action="store_true")
    for phase in (create_args, train_args):
        phase.add_argument("--size", choices=sorted(SIZES), default="8b")
    args = parser.parse_args()
    result = {"create": create, "train": train, "export": export}[args.phase](args)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
