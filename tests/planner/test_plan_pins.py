"""Every candidate's estimates and the chosen plan, pinned for a few models and machines: the planner's arithmetic
may move between modules, never change. Regenerate the fixture only for an intended change of the model:
`python -m tests.planner.test_plan_pins`."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

from lightning_offload.planner import Ceilings, Disk, Machine, ModelStats, PlanDoesNotFit, RunNeeds, plan
from lightning_offload.planner.memory import checkpoint_bytes
from tests.planner.test_memory import LLAMA_8B

FIXTURE = Path(__file__).parent / "fixtures" / "plan_pins.json"
SMALL = ModelStats(parameters=124_000_000, block_parameters=7_000_000, blocks=12, activation_bytes_per_block=50_000_000,
                   block_input_bytes=3_000_000, logits=4 * 512 * 50257, embedding_parameters=38_600_000, tokens=2048,
                   width=768)
LORA_8B = dataclasses.replace(LLAMA_8B, frozen_parameters=8_000_000_000, frozen_block_parameters=217_000_000,
                              frozen_embedding_parameters=525_336_576)
DISK = Disk(path="/nvme", read_gbps=6.0, write_gbps=4.0, free_bytes=2 * 2**40)
CASES: dict[str, dict[str, Any]] = {
    "8b_h100": {"model": LLAMA_8B},
    "8b_40gb": {"model": LLAMA_8B, "machine": Machine(gpu_memory_gib=40, host_memory_gib=64)},
    "8b_24gb_accumulate": {"model": LLAMA_8B, "machine": Machine(gpu_memory_gib=24, host_memory_gib=128),
                           "accumulate": 4},
    "8b_h100_clipped_8bit": {"model": LLAMA_8B, "needs": RunNeeds(gradient_clip_val=1.0), "optimizer": "adamw8bit"},
    "8b_two_ranks": {"model": LLAMA_8B, "world_size": 2, "ranks_per_host": 2},
    "8b_four_ranks_big_hosts": {"model": LLAMA_8B, "machine": Machine(host_memory_gib=500), "world_size": 4,
                               "ranks_per_host": 2, "accumulate": 2},
    "8b_nvme": {"model": LLAMA_8B, "machine": Machine(gpu_memory_gib=24, host_memory_gib=48), "disk": DISK},
    "8b_lora_16gb": {"model": LORA_8B, "machine": Machine(gpu_memory_gib=16, host_memory_gib=64)},
    "small_cpu": {"model": SMALL, "machine": Machine(gpu_memory_gib=8, host_memory_gib=8, unified=True),
                  "ceilings": Ceilings(device="cpu", matmul_tflops=0.1, h2d_gbps=math.inf, d2h_gbps=math.inf,
                                       duplex_gbps=math.inf, cpu_adamw_gparams=1.0, on_gpu=False), "device": "cpu"},
    "8b_stream_pinned": {"model": LLAMA_8B, "machine": Machine(gpu_memory_gib=12, host_memory_gib=64),
                         "backend": "stream"},
    "8b_too_small": {"model": LLAMA_8B, "machine": Machine(gpu_memory_gib=4, host_memory_gib=8)},
}


def outcome(case: dict[str, Any]) -> dict[str, Any]:
    levers = {"ceilings": Ceilings(), "machine": Machine(), "device": "cuda", **case}
    report = plan(levers.pop("model"), **levers)
    rows = report.rows()
    result: dict[str, Any] = {"rows": rows, "reason": report.reason}
    if report.chosen is None:
        result["refusal"] = str(report.error())
    else:
        result["checkpoint_bytes"] = checkpoint_bytes(report.stats, report.chosen.plan)
    return result


def test_plan_pins_case_names_are_the_fixtures() -> None:
    assert set(json.loads(FIXTURE.read_text())) == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_planners_tables_and_choices_are_unchanged(name: str) -> None:
    pinned = json.loads(FIXTURE.read_text())[name]
    assert json.loads(json.dumps(outcome(CASES[name]))) == pinned


def _refresh() -> None:
    try:
        FIXTURE.write_text(json.dumps({name: outcome(case) for name, case in CASES.items()}, indent=1) + "\n")
    except PlanDoesNotFit as error:
        raise SystemExit(str(error)) from error


if __name__ == "__main__":
    _refresh()
