"""Peak host memory of `export_hf` and `consolidate` on the CPU, beside the size of one checkpoint file and tensor.

    python -m bench.studies.export_memory --folder /tmp/export_1.5b --size 1.5b

Writes the size's Llama (random bf16 weights, as a module holding it at `self.model` names them) in `--folder` in two
checkpoint formats unless they are there: the `stream` backend's folder (one file per unit: the embedding, each
decoder layer, the final norm with the output layer; weights only) and Lightning's single file (what `device`,
`gpu_8bit` and `fsdp` save, bf16). Then runs, each in a fresh process with the checkpoint dropped from the page cache:

    export_hf    `export_hf(checkpoint, out, config=...)`: bf16 safetensors shards of 2 GiB
    consolidate  `consolidate(checkpoint, out)`: the fp32 state dict, written one tensor at a time
    whole        the fp32 state dict built in memory, then `torch.save` (what `consolidate` did before it streamed)

Each prints one `RESULT {json}` line (seconds, peak RSS (VmHWM), peak anonymous RSS sampled every 10 ms, RSS before
the call), then a table with the largest checkpoint file and tensor beside them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.studies.safetensors_reader import GIB, PeakRss, drop_from_page_cache, status_bytes

FORMATS = ("stream", "lightning")
WAYS = ("export_hf", "consolidate", "whole")
PREFIX = "model."  # a LightningModule holding the Hugging Face model at `self.model`


def make_checkpoints(size: str, folder: Path) -> dict[str, Path]:
    from transformers import LlamaForCausalLM

    from bench.models import SIZES
    from lightning_offload.backends.stream.checkpoint import FORMAT, MANIFEST
    from lightning_offload.saving import atomic_directory

    paths = {"stream": folder / "stream.ckpt", "lightning": folder / "lightning.ckpt", "config": folder / "config"}
    if all(path.exists() for path in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    config = SIZES[size].llama_config()
    config.save_pretrained(paths["config"])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    units: list[tuple[str, list[str]]] = [("model.model.embed_tokens", ["model.embed_tokens.weight"])]
    names = [name for name, _ in model.named_parameters()]
    units += [(f"model.model.layers.{i}", [n for n in names if n.startswith(f"model.layers.{i}.")])
              for i in range(config.num_hidden_layers)]
    units.append(("model.model.norm", ["model.norm.weight", "lm_head.weight"]))
    shapes = {n: p.shape for n, p in model.named_parameters()}
    state_dict = {}
    manifest: dict[str, Any] = {"format": FORMAT, "dtype": "bfloat16", "units": []}
    with atomic_directory(paths["stream"]) as staging:
        torch.save({}, staging / "trainer.pt")
        for index, (module, names) in enumerate(units):
            weights = [torch.randn(shapes[n], generator=generator, dtype=torch.bfloat16) for n in names]
            file = f"unit_{index:04d}.pt"
            torch.save({"weights": weights, "state": [], "steps": []}, staging / file)
            manifest["units"].append({"file": file, "module": module, "names": [[PREFIX + n] for n in names]})
            state_dict.update({PREFIX + n: w for n, w in zip(names, weights)})
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
    torch.save({"state_dict": state_dict}, paths["lightning"])
    return paths


def run(way: str, checkpoint: Path, config: Path, out: Path) -> dict[str, Any]:
    """One call, in this (fresh) process."""
    import lightning_offload
    from lightning_offload.consolidation import fp32_tensors

    before = status_bytes("VmRSS")
    with PeakRss() as peak:
        started = time.perf_counter()
        if way == "export_hf":
            lightning_offload.export_hf(checkpoint, out, config=config)
        elif way == "consolidate":
            lightning_offload.consolidate(checkpoint, out)
        else:
            torch.save(dict(fp32_tensors(checkpoint)), out)
        seconds = time.perf_counter() - started
    written = sum(f.stat().st_size for f in ([out] if out.is_file() else out.rglob("*")) if f.is_file())
    return {"way": way, "seconds": seconds, "written_gib": written / GIB, "rss_before_gib": before / GIB,
            "vmhwm_gib": status_bytes("VmHWM") / GIB, "peak_rss_gib": peak.rss / GIB, "peak_anon_gib": peak.anon / GIB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", default="/tmp/export_memory")
    parser.add_argument("--size", default="1.5b")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument("--child", nargs=2, metavar=("WAY", "FORMAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = Path(args.folder)
    paths = {"stream": folder / "stream.ckpt", "lightning": folder / "lightning.ckpt", "config": folder / "config"}
    if args.child:
        way, form = args.child
        print("RESULT " + json.dumps(run(way, paths[form], paths["config"], folder / "out")), flush=True)
        return
    paths = make_checkpoints(args.size, folder)
    rows = []
    for form in args.formats.split(","):
        files = [paths[form]] if paths[form].is_file() else sorted(paths[form].glob("unit_*.pt"))
        largest_file = max(f.stat().st_size for f in files)
        for way in args.ways.split(","):
            for file in files:
                drop_from_page_cache(file)
            shutil.rmtree(folder / "out", ignore_errors=True)
            (folder / "out").unlink(missing_ok=True)
            done = subprocess.run([sys.executable, "-m", "bench.studies.export_memory", "--folder", args.folder,
                                   "--child", way, form], capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.split("RESULT ", 1)[1])
            rows.append({**result, "format": form, "largest_file_gib": largest_file / GIB,
                         "checkpoint_gib": sum(f.stat().st_size for f in files) / GIB})
            print("RESULT " + json.dumps(rows[-1]), flush=True)
    shutil.rmtree(folder / "out", ignore_errors=True)
    (folder / "out").unlink(missing_ok=True)
    print("\n| checkpoint | call | s | written | RSS before | peak RSS (VmHWM) | peak anonymous RSS | largest file |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['format']} ({row['checkpoint_gib']:.2f} GiB) | {row['way']} | {row['seconds']:.1f} | "
              f"{row['written_gib']:.2f} GiB | {row['rss_before_gib']:.2f} | {row['vmhwm_gib']:.2f} | "
              f"{row['peak_anon_gib']:.2f} | {row['largest_file_gib']:.2f} |")


if __name__ == "__main__":
    main()
