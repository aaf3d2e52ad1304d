"""Loss curves of the 8-bit optimizers against fp32 AdamW on the main job's data (the standard library's text).

    python -m bench.studies.optim_convergence [--steps 300] [--seeds 1234 1 2] [--lr 3e-3] [--runs reference gpu_8bit]

Trains the main job's byte-level GPT with `single_gpu_offload` from the same initial weights (drawn on the CPU from
the seed) on the same batches: fp32 weights with torch AdamW (`backend="device"`) as the reference; the usual bf16
recipe (the same under bf16 autocast, `reference_bf16`), which shows how far bf16 compute alone moves the curve;
then bf16 weights (`precision="bf16-true"`) with lightning_offload's fused 8-bit AdamW stepped after backward, the
same update inside backward (`backend="gpu_8bit"`), exact AdamW in host memory (`backend="host_adam"`), the
streaming plan with every block streamed (`backend="stream"`), and bitsandbytes' AdamW8bit. On a GPU machine the
runs use the GPU (the Triton kernel), elsewhere the CPU. Prints a markdown table of each run's final validation
loss, its distance from the reference, and how far its train-loss curve (50-step moving average, after the first
50 steps) strays from the reference's. `--deterministic` selects deterministic GPU kernels (SDPA's and the
embedding's backward otherwise add with atomics, so two identical GPU runs differ and, at lr 3e-3, drift apart by
a few percent): then runs of the same update math (fused, gpu_8bit, stream) give identical curves. `--curves FILE`
writes every train curve as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_offload import SingleGPUOffloadStrategy
from lightning_offload.data import StdlibText
from lightning_offload.models import CausalLM, build_network

# name -> (label, backend, optimizer, precision, other strategy options)
RUNS: dict[str, tuple[str, str, str | None, str, dict[str, Any]]] = {
    "reference": ("torch AdamW, fp32 weights (reference)", "device", "adamw", "32-true", {}),
    # The usual bf16 recipe (fp32 weights and AdamW, bf16 autocast): how far bf16 compute alone moves the curve.
    "reference_bf16": ("torch AdamW, fp32 weights, bf16 autocast", "device", "adamw", "bf16-mixed", {}),
    "fused": ("lightning_offload AdamW8bitFused, bf16 weights", "device", "adamw8bit_fused", "bf16-true", {}),
    "gpu_8bit": ("gpu_8bit: AdamW8bitFused inside backward, bf16 weights", "gpu_8bit", None, "bf16-true", {}),
    "host_adam": ("host_adam: fp32 master + AdamW in host memory inside backward, bf16 weights", "host_adam", None,
                  "bf16-true", {}),
    # Every block's state in host memory (the tiny model's would all fit on the GPU), so every update crosses PCIe:
    # the updated weights cast to bf16 on the GPU (the default) or on the host, both rounding to nearest even.
    "host_adam_all_host": ("host_adam, all state in host memory, weights cast on the GPU", "host_adam", None,
                           "bf16-true", {"gpu_state_blocks": 0}),
    "host_adam_all_host_cast_on_host": ("host_adam, all state in host memory, weights cast on the host", "host_adam",
                                        None, "bf16-true", {"gpu_state_blocks": 0, "cast_on_device": False}),
    # Every block and the final norm streamed; built for real (not on meta) so it can start from the runs' weights.
    "stream": ("stream: every block streamed, 8-bit state in host memory, bf16 weights", "stream", None, "bf16-true",
               {"resident_blocks": 0, "stream_outer": True, "build_on_meta": False, "check_memory": False}),
    "bnb": ("bitsandbytes AdamW8bit, bf16 weights", "device", "adamw8bit", "bf16-true", {}),
}
WINDOW = 50


class _TrainLosses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))


NETWORK = dict(d_model=128, n_layers=4, n_heads=4, max_seq_len=128)


class _SameStart(CausalLM):
    """Starts from `initial` (fp32, drawn on the CPU), whatever device and dtype the backend builds the network on:
    backends build where their weights live (the GPU's random generator for `device`, the host's for `stream`), so
    seeding alone gives each run other initial weights on a GPU machine."""

    def __init__(self, initial: dict[str, torch.Tensor], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._initial = initial

    def configure_model(self) -> None:
        if self.net is None:
            super().configure_model()
            with torch.no_grad():
                self.net.load_state_dict(self._initial)


def train(backend: str, optimizer: str | None, precision: str, options: dict[str, Any], steps: int,
          seed: int, lr: float) -> tuple[float, list[float], float]:
    pl.seed_everything(seed)
    initial = build_network("gpt", NETWORK).state_dict()
    model = _SameStart(initial, network=NETWORK, max_steps=steps, lr=lr)
    data = StdlibText(max_bytes=2_000_000, seq_len=128, batch_size=16, seed=seed)
    curve = _TrainLosses()
    trainer = pl.Trainer(strategy=SingleGPUOffloadStrategy(backend=backend, optimizer=optimizer, **options), precision=precision,
                         max_steps=steps, limit_val_batches=20, val_check_interval=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[curve])
    started = time.perf_counter()
    trainer.fit(model, data)
    return float(trainer.callback_metrics["val/loss"]), curve.losses, time.perf_counter() - started


def curve_distance(curve: list[float], reference: list[float]) -> float:
    """Largest relative gap between the two curves' moving averages, leaving out the first `WINDOW` steps."""
    kernel = torch.full((1, 1, WINDOW), 1.0 / WINDOW)

    def smooth(values: list[float]) -> torch.Tensor:
        return torch.nn.functional.conv1d(torch.tensor(values)[None, None], kernel)[0, 0]

    ours, theirs = smooth(curve), smooth(reference)
    return float(((ours - theirs).abs() / theirs).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help=f"at least {WINDOW}, the curve gap's window")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234])
    parser.add_argument("--lr", type=float, default=CausalLM.DEFAULT_LR, help="peak learning rate (the main job's)")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--deterministic", action="store_true", help="deterministic GPU kernels")
    parser.add_argument("--curves", help="write {seed: {run: train losses}} as JSON to this file")
    args = parser.parse_args()
    if args.steps < WINDOW:
        parser.error(f"--steps {args.steps}: the curve gap averages over {WINDOW} steps; train at least that many.")
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    curves: dict[int, dict[str, list[float]]] = {}
    names = ["reference", *(name for name in args.runs if name != "reference")]
    print(f"\nlr {args.lr:g}\n| seed | optimizer ({args.steps} steps) | final val loss | vs reference | curve gap (max, "
          f"{WINDOW}-step avg) | wall s |\n|---|---|---|---|---|---|")
    for seed in args.seeds:
        results = {name: train(*RUNS[name][1:], args.steps, seed, args.lr) for name in names}
        curves[seed] = {name: curve for name, (_, curve, _) in results.items()}
        reference, reference_curve, _ = results["reference"]
        for name, (loss, curve, seconds) in results.items():
            print(f"| {seed} | {RUNS[name][0]} | {loss:.4f} | {100 * (loss / reference - 1):+.2f}% | "
                  f"{100 * curve_distance(curve, reference_curve):.2f}% | {seconds:.0f} |", flush=True)
        if args.curves:
            with open(args.curves, "w") as out:
                json.dump(curves, out)


if __name__ == "__main__":
    main()
