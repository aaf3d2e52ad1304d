"""Our safetensors reader beside the `safetensors` library's: a bf16 checkpoint loaded into host memory on the CPU.

    python -m bench.studies.safetensors_reader --folder /tmp/reader_1.5b --size 1.5b --repeats 2

Saves the size's Llama weights (random bf16 values, `safetensors.torch.save_file`, one file) in `--folder` unless
they are there, then runs each way of loading in a fresh process, `--repeats` times, cold (the file dropped from the
page cache first) and warm (the file in the page cache):

    ours       lightning_offload's reader, `readinto` straight into preallocated tensors (what `pretrained` does)
    safe_open  `safetensors.safe_open(...).get_tensor(name)`, then `copy_` into the same preallocated tensors
    load_file  `safetensors.torch.load_file(file)` (tensors that map the file), then `copy_` into the same
               preallocated tensors, as `module.load_state_dict` does

Each prints one `RESULT {json}` line: seconds, GB/s, the process's peak RSS (VmHWM), the peaks of RSS and of its
anonymous part (RssAnon: memory of the process's own, not file pages mapped into it) sampled every 10 ms, and the RSS
once the destinations exist; a table follows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

GIB = 2**30
WAYS = ("ours", "safe_open", "load_file")
FILE = "model.safetensors"


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """The largest VmRSS and RssAnon of this process while the `with` block runs, sampled every 10 ms."""

    def __init__(self) -> None:
        self.rss = self.anon = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.rss = max(self.rss, status_bytes("VmRSS"))
            self.anon = max(self.anon, status_bytes("RssAnon"))
            self._stop.wait(0.01)

    def __enter__(self) -> PeakRss:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.rss = max(self.rss, status_bytes("VmRSS"))
        self.anon = max(self.anon, status_bytes("RssAnon"))


def make_checkpoint(size: str, folder: Path) -> Path:
    """The size's Llama weights with random bf16 values, saved by the `safetensors` library itself."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from bench.models import SIZES

    file = folder / FILE
    if file.is_file():
        return file
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in LlamaForCausalLM(SIZES[size].llama_config()).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    weights = {name: torch.randn(shape, generator=generator, dtype=torch.bfloat16) for name, shape in shapes.items()}
    save_file(weights, file, metadata={"format": "pt"})
    return file


def drop_from_page_cache(file: Path) -> None:
    with open(file, "rb") as handle:
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def load(way: str, file: Path) -> dict[str, Any]:
    """One way of loading `file`, in this (fresh) process."""
    from lightning_offload._safetensors import Reader, read_header

    entries = read_header(file)
    # Written once, so their pages are resident before the clock starts, as a model's parameters are.
    destinations = {name: torch.zeros(e.shape, dtype=e.dtype) for name, e in entries.items()}
    ready = status_bytes("VmRSS")
    with PeakRss() as peak:
        started = time.perf_counter()
        if way == "ours":
            reader = Reader()
            for name, entry in entries.items():
                reader.read_into(entry, destinations[name])
            reader.close()
        elif way == "safe_open":
            from safetensors import safe_open

            with safe_open(file, "pt") as handle:
                for name in entries:
                    destinations[name].copy_(handle.get_tensor(name))
        else:
            from safetensors.torch import load_file

            for name, tensor in load_file(file).items():
                destinations[name].copy_(tensor)
        seconds = time.perf_counter() - started
    # Each tensor's first value, summed: equal in every row when every way loaded the same values.
    checksum = sum(int(t.view(torch.int16).view(-1)[:1].item()) for t in destinations.values())
    return {"way": way, "seconds": seconds, "gb_s": file.stat().st_size / 1e9 / seconds,
            "file_gib": file.stat().st_size / GIB, "rss_ready_gib": ready / GIB,
            "vmhwm_gib": status_bytes("VmHWM") / GIB,
            "peak_rss_gib": peak.rss / GIB, "peak_anon_gib": peak.anon / GIB, "tensors": len(destinations),
            "checksum": checksum}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", default="/tmp/safetensors_reader")
    parser.add_argument("--size", default="1.5b")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    file = Path(args.folder) / FILE
    if args.child:
        print("RESULT " + json.dumps(load(args.child, file)), flush=True)
        return
    file = make_checkpoint(args.size, Path(args.folder))
    rows = []
    for repeat in range(args.repeats):
        for cache in ("cold", "warm"):
            for way in args.ways.split(","):
                if cache == "cold":
                    drop_from_page_cache(file)
                else:  # read once through, so every page is cached
                    with open(file, "rb") as handle:
                        while handle.read(1 << 26):
                            pass
                run = subprocess.run([sys.executable, "-m", "bench.studies.safetensors_reader", "--folder",
                                      args.folder, "--child", way], capture_output=True, text=True, check=True)
                result = json.loads(run.stdout.split("RESULT ", 1)[1])
                rows.append({**result, "cache": cache, "repeat": repeat})
                print("RESULT " + json.dumps(rows[-1]), flush=True)
    print("\n| way | page cache | s | GB/s | RSS with destinations | peak RSS (VmHWM) | peak anonymous RSS |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['way']} | {row['cache']} | {row['seconds']:.2f} | {row['gb_s']:.2f} | "
              f"{row['rss_ready_gib']:.2f} GiB | {row['vmhwm_gib']:.2f} | {row['peak_anon_gib']:.2f} |")


if __name__ == "__main__":
    main()
