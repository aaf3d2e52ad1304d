"""Step time, throughput and memory of the main job (any `model=` / `data=` overrides) through `single_gpu_offload`.

    python -m bench.studies.main_job_gpu model=llama_1b data=random_tokens trainer.max_steps=8 trainer.limit_val_batches=0

Prints one `RESULT {json}` line with what `lightning_offload.telemetry.ThroughputMonitor` measured: median and mean
optimizer-step time after the first two steps, tokens/s, model TFLOP/s (6 x non-embedding parameters x tokens / s),
MFU on a known GPU, peak GPU memory (torch's allocator, and device-wide from `mem_get_info`), peak pinned host
memory and the process's peak host RSS.
"""

from __future__ import annotations

import json
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import lightning_offload
from lightning_offload.train import train


def initialize_configs():
    """The main job's configs: the installed package's, or a source checkout's `conf/` (run from the repository
    root, `python -m` imports the checkout, whose `conf/` sits beside the package)."""
    if find_spec("lightning_offload.conf") is not None:
        return initialize_config_module(config_module="lightning_offload.conf", version_base="1.3")
    return initialize_config_dir(str(Path(lightning_offload.__file__).resolve().parent.parent / "conf"),
                                 version_base="1.3")


def main(overrides: list[str]) -> dict:
    with initialize_configs():
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(Path("outputs/bench") / time.strftime("%Y%m%d-%H%M%S"))
    HydraConfig.instance().set_config(cfg)
    started = time.perf_counter()
    metrics = train(cfg)
    result = {
        "overrides": overrides,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        **{name: round(value, 3) for name, value in metrics.items()},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
