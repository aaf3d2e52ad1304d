"""A fine-tune of a `from_pretrained` checkpoint beside the same model built from its config, under
`single_gpu_offload`: the plan each gets and its step time (R1: micro-batch 4 x 2048 tokens, bf16-mixed, AdamW lr 1e-5).

    python -m bench.studies.pretrained --size 8b --folder /tmp/llama_8b_pretrained --steps 6 --warmup 2

Saves the size's Llama at random init (bf16 safetensors, `save_pretrained`) in `--folder` unless one is there, then
fits each (variant, source) in its own process, so each starts on a clean GPU, and prints one `RESULT {json}` line
per fit and a table. Sources: `config` builds the model in `configure_model` from its config (bench's
`LlamaModule`), `pretrained` loads it there with `AutoModelForCausalLM.from_pretrained(folder, dtype=bfloat16)`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


import torch

from bench.models import SIZES, build_llama
from bench.runners import LlamaModule

# The strategy's options per variant: its defaults, and the fastest 8B R1 configuration measured so far.
VARIANTS = {"default": {}, "compiled_8bit": {"compile_blocks": True, "optimizer": "adamw8bit_fused"}}
SOURCES = ("config", "pretrained")


class PretrainedLlamaModule(LlamaModule):
    """`LlamaModule` whose `configure_model` loads a checkpoint, as a fine-tune does."""

    def __init__(self, folder: str) -> None:
        super().__init__(size="", checkpointing="by_strategy", optimizer="adamw")
        self.folder = folder

    def configure_model(self) -> None:
        from transformers import AutoModelForCausalLM

        if self.model is None:
            self.model = AutoModelForCausalLM.from_pretrained(self.folder, dtype=torch.bfloat16)


def save_checkpoint(size: str, folder: Path) -> float:
    """Seconds spent saving the size's randomly initialised Llama in bf16 to `folder`; 0 when one is there."""
    if list(folder.glob("*.safetensors")):
        return 0.0
    started = time.perf_counter()
    # Initialised on the GPU where there is one: seconds, where the host's init of 8B parameters takes minutes.
    model = build_llama(size, dtype=torch.bfloat16, device="cuda" if torch.cuda.is_available() else "cpu")
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return time.perf_counter() - started


def fit_one(size: str, folder: str, source: str, variant: str, steps: int, warmup: int, micro_batch: int,
            seq: int) -> dict[str, object]:
    """One fit in this process: its plan, step times and memory peak."""
    import lightning as L
    from torch.utils.data import DataLoader

    import lightning_offload
    from bench.measure import StepClock
    from bench.runners import _Clock, _planned, _RandomTokens

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clock = StepClock(device)
    trainer = L.Trainer(accelerator=device.type, devices=1,
                        strategy=lightning_offload.SingleGPUOffloadStrategy(**VARIANTS[variant]),
                        precision="bf16-mixed", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[_Clock(clock, 1)])
    module = PretrainedLlamaModule(folder) if source == "pretrained" else LlamaModule(size, "by_strategy", "adamw")
    tokens = _RandomTokens(steps * micro_batch, seq, SIZES[size].vocab)
    started = time.perf_counter()
    trainer.fit(module, DataLoader(tokens, batch_size=micro_batch))
    planned = _planned(trainer.strategy)
    return {
        "size": size, "source": source, "variant": variant, **{k: planned.get(k) for k in
                                                                ("plan", "predicted_step_s", "predicted_gpu_gib")},
        "step_s_median": round(statistics.median(clock.times[warmup:] or clock.times), 4),
        "step_s": [round(t, 3) for t in clock.times], "losses": clock.losses,
        "fit_s": round(time.perf_counter() - started, 1),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="8b", choices=sorted(SIZES))
    parser.add_argument("--folder", default="/tmp/llama_pretrained")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--sources", default=",".join(SOURCES))
    parser.add_argument("--timeout-s", type=int, default=240, help="per fit")
    parser.add_argument("--results", type=Path, help="append one JSON line per fit here")
    parser.add_argument("--one", nargs=2, metavar=("SOURCE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = fit_one(args.size, args.folder, *args.one, args.steps, args.warmup, args.micro_batch, args.seq)
        print("RESULT " + json.dumps(result), flush=True)
        return
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    print(f"saved {args.size} to {folder} in {save_checkpoint(args.size, folder):.0f} s", flush=True)
    rows = []
    for variant in args.variants.split(","):
        for source in args.sources.split(","):
            command = [sys.executable, "-m", "bench.studies.pretrained", "--one", source, variant, "--size", args.size, "--folder",
                       str(folder), "--steps", str(args.steps), "--warmup", str(args.warmup), "--micro-batch",
                       str(args.micro_batch), "--seq", str(args.seq)]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout_s)
                output, status = done.stdout + done.stderr, done.returncode
            except subprocess.TimeoutExpired as expired:
                output, status = f"{expired.stdout or ''}{expired.stderr or ''}timed out", "timeout"
            result = next((json.loads(line[len("RESULT "):]) for line in output.splitlines()
                           if line.startswith("RESULT ")), None)
            if result is None:
                result = {"size": args.size, "source": source, "variant": variant, "status": status,
                          "error": output[-2000:]}
            print(f"== {variant} / {source}: exit {status}", flush=True)
            print("\n".join(line for line in output.splitlines()
                            if line.startswith(("Plans for", "->", "Chosen", "No measured", "`single_gpu_offload`"))
                            or "cannot be built on the meta device" in line), flush=True)
            print("RESULT " + json.dumps(result), flush=True)
            rows.append(result)
            if args.results:
                with args.results.open("a") as stream:
                    stream.write(json.dumps(result) + "\n")
    print(f"{'variant':14} {'source':11} {'s/step':>7} {'GPU GiB':>8} {'fit s':>6}  plan")
    for row in rows:
        print(f"{row['variant']:14} {row['source']:11} {row.get('step_s_median', float('nan')):7.3f} "
              f"{row.get('peak_gpu_gib') or float('nan'):8.1f} {row.get('fit_s', float('nan')):6.0f}  "
              f"{row.get('plan') or row.get('error', '')[-200:]}")


if __name__ == "__main__":
    main()
