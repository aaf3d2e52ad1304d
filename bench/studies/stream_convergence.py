"""Loss curve of the `stream` backend against fp32 AdamW without offload, on the main job's data (CPU, tiny model).

    python -m bench.studies.stream_convergence [--steps 300] [--seed 1234]

Same seed, same batches, same initial weights (`build_on_meta=False`): fp32 weights with torch AdamW on
`backend="device"` as the reference; bf16 weights, 8-bit AdamW state and updates inside backward on
`backend="stream"`, with every block and the final norm streamed (the CPU stands in for the device). Prints the
final validation loss of each and the distance; the acceptance bound is 2%.
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl

from lightning_offload import SingleGPUOffloadStrategy
from lightning_offload.data import StdlibText
from lightning_offload.models import CausalLM


def final_validation_loss(strategy: SingleGPUOffloadStrategy, precision: str, steps: int, seed: int) -> tuple[float,
                                                                                                               float]:
    pl.seed_everything(seed)
    model = CausalLM(network=dict(d_model=128, n_layers=4, n_heads=4, max_seq_len=128), max_steps=steps)
    data = StdlibText(max_bytes=2_000_000, seq_len=128, batch_size=16, seed=seed)
    trainer = pl.Trainer(strategy=strategy, precision=precision, accelerator="cpu", max_steps=steps,
                         limit_val_batches=20, val_check_interval=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    started = time.perf_counter()
    trainer.fit(model, data)
    return float(trainer.callback_metrics["val/loss"]), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    reference = final_validation_loss(SingleGPUOffloadStrategy(backend="device", optimizer="adamw"), "32-true",
                                      args.steps, args.seed)
    streamed = final_validation_loss(
        SingleGPUOffloadStrategy(backend="stream", resident_blocks=0, stream_outer=True, build_on_meta=False,
                                 check_memory=False),
        "bf16-true", args.steps, args.seed)
    print(f"\n| plan ({args.steps} steps, seed {args.seed}) | final val loss | vs reference | wall s |\n|---|---|---|---|")
    for name, (loss, seconds) in {"fp32 AdamW, no offload (reference)": reference,
                                  "stream: bf16 weights, 8-bit state, all blocks streamed": streamed}.items():
        print(f"| {name} | {loss:.4f} | {100 * (loss / reference[0] - 1):+.2f}% | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
