"""Loss curves of the 8-bit optimizers against fp32 AdamW on the main job's data (the standard library's text).

    python bench/optim_convergence.py [--steps 300] [--seeds 1234 1 2]

Trains the main job's byte-level GPT with `single_gpu_offload` (`backend="device"`) from the same seed on the same
batches: fp32 weights with torch AdamW as the reference, then bf16 weights (`precision="bf16-true"`) with
lightning_offload's fused 8-bit AdamW (stochastic rounding) and with bitsandbytes' AdamW8bit. Prints a markdown
table of the final validation loss of each and its distance from the reference.
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl

from lightning_offload import SingleGPUOffloadStrategy
from lightning_offload.data import StdlibText
from lightning_offload.models import CausalLM

RUNS = {
    "torch AdamW, fp32 weights (reference)": ("adamw", "32-true"),
    "lightning_offload AdamW8bitFused, bf16 weights": ("adamw8bit_fused", "bf16-true"),
    "bitsandbytes AdamW8bit, bf16 weights": ("adamw8bit", "bf16-true"),
}


def final_validation_loss(optimizer: str, precision: str, steps: int, seed: int) -> tuple[float, float]:
    pl.seed_everything(seed)
    model = CausalLM(network=dict(d_model=128, n_layers=4, n_heads=4, max_seq_len=128), max_steps=steps)
    data = StdlibText(max_bytes=2_000_000, seq_len=128, batch_size=16, seed=seed)
    trainer = pl.Trainer(strategy=SingleGPUOffloadStrategy(backend="device", optimizer=optimizer), precision=precision,
                         max_steps=steps, limit_val_batches=20, val_check_interval=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    started = time.perf_counter()
    trainer.fit(model, data)
    return float(trainer.callback_metrics["val/loss"]), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234])
    args = parser.parse_args()
    print(f"\n| seed | optimizer ({args.steps} steps) | final val loss | vs reference | wall s |\n|---|---|---|---|---|")
    for seed in args.seeds:
        results = {name: final_validation_loss(*choice, args.steps, seed) for name, choice in RUNS.items()}
        reference = next(iter(results.values()))[0]
        for name, (loss, seconds) in results.items():
            print(f"| {seed} | {name} | {loss:.4f} | {100 * (loss / reference - 1):+.2f}% | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
