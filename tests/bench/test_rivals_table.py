"""The rivals calls' table: our row's tokens/s over each rival's measured in the same call, and the best rival."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.rivals_table import load, table


def _record(cell: str, tokens_per_s: float | None, status: str = "ok", **fields) -> dict:
    return {"cell": cell, "status": status, "tokens_per_s": tokens_per_s, "step_s_median": 1.0, **fields}


def test_ratios_divide_our_rate_by_each_rivals_and_name_the_best_rival(tmp_path):
    results = tmp_path / "rivals.jsonl"
    records = [
        {"probe": True},
        _record("8b/single_gpu_offload_gpu_8bit_compiled/r1", 10000.0),
        _record("8b/torchtune_compiled/r1", 8000.0),
        _record("8b/torchtune/r1", 5000.0),
        _record("8b/torchao_offload/r1", None, status="killed", cause="killed by SIGKILL, no Python error"),
        _record("8b/torchtune/r1", 6250.0),  # measured again: the newest record counts
    ]
    results.write_text("\n".join(map(json.dumps, records)) + "\n")
    groups = load([results])
    assert list(groups) == [("8b", "r1")]
    # The first of our rows measured is the reference: the eager one was not measured in this call.
    ours = ["single_gpu_offload_gpu_8bit", "single_gpu_offload_gpu_8bit_compiled"]
    lines = table("8b", "r1", groups[("8b", "r1")], ours)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ") and "---" not in line}
    assert "| 1.25x |" in rows["torchtune_compiled"] and "| 1.60x |" in rows["torchtune"]
    assert "killed by SIGKILL" in rows["torchao_offload"] and "x |" not in rows["torchao_offload"]
    assert "ratios are single_gpu_offload_gpu_8bit_compiled's" in lines[0]
    assert lines[-1] == ("best rival: torchtune_compiled (8000.0 tokens/s); single_gpu_offload_gpu_8bit_compiled "
                         "1.25x")


def test_it_runs_as_a_module_from_the_repository_root(tmp_path):
    results = tmp_path / "rivals.jsonl"
    results.write_text("\n".join(map(json.dumps, [_record("3.6b/single_gpu_offload_fsdp/r1", 300.0),
                                                   _record("3.6b/lightning_fsdp_cpu_offload/r1", 200.0)])) + "\n")
    done = subprocess.run([sys.executable, "-m", "bench.rivals_table", str(results), "--ours",
                           "single_gpu_offload_fsdp"], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert "best rival: lightning_fsdp_cpu_offload (200.0 tokens/s); single_gpu_offload_fsdp 1.50x" in done.stdout
