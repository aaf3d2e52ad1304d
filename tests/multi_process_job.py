"""`strategy="offload"` fits of the tiny transformer on the CPU with `--devices` processes, for the tests.

Run as a script: Lightning's launcher re-runs it once per extra process, as it would a user's training script. The
fits listed in `--fits` (JSON: a list of {"name", "backend", "optimizer", "epochs", "resume", "save",
"save_weights_only"}) run one after
another in the same processes, which saves starting them again. Each rank writes the losses of its own
micro-batches to `<out>/<name>_rank<r>.json`, and the plan it trained with to `<out>/<name>_rank<r>_plan.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

# The repository root instead of `tests/`, whose packages would shadow installed ones (`kernels`).
sys.path[0] = str(Path(__file__).resolve().parents[1])

import lightning.pytorch as pl  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

import lightning_offload  # noqa: E402
from lightning_offload.planner.record import plan_state  # noqa: E402
from tests.conftest import TinyLM, token_batches  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True, help="per process")
    parser.add_argument("--num-batches", type=int, required=True, help="per process and epoch")
    parser.add_argument("--fits", type=json.loads, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

    for spec in args.fits:
        strategy = lightning_offload.OffloadStrategy(backend=spec["backend"], optimizer=spec.get("optimizer"))
        trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=args.devices,
                             max_epochs=spec.get("epochs", 1), gradient_clip_val=1.0, use_distributed_sampler=False,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False)
        # The data set is the sequence of global batches; rank r takes the samples r, r + devices, ... in order
        # (Lightning's own sampler would shuffle them), so each step's global batch is the same at any world size.
        dataset = token_batches(args.num_batches * args.devices, batch_size=args.batch_size).dataset
        sampler = DistributedSampler(dataset, num_replicas=args.devices, rank=trainer.global_rank, shuffle=False)
        module = TinyLM(scheduler="step")
        trainer.fit(module, DataLoader(dataset, batch_size=args.batch_size, sampler=sampler),
                    ckpt_path=spec.get("resume"))
        if spec.get("save"):
            trainer.save_checkpoint(spec["save"])
        if spec.get("save_weights_only"):
            trainer.save_checkpoint(spec["save_weights_only"], weights_only=True)
        (args.out / f"{spec['name']}_rank{trainer.global_rank}.json").write_text(json.dumps(module.losses))
        plan = trainer.strategy.plan
        (args.out / f"{spec['name']}_rank{trainer.global_rank}_plan.json").write_text(
            json.dumps(None if plan is None else plan_state(plan)))

if __name__ == "__main__":
    main()
