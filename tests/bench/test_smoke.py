"""End to end on the CPU: `python -m bench run` runs the tiny model with the plain loop in a subprocess, records the cells
that cannot run here, and renders the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_plain_loop_through_run_py(tmp_path):
    results, report = tmp_path / "results.jsonl", tmp_path / "RESULTS.md"
    command = [sys.executable, "-m", "bench", "run", "--sizes", "tiny", "--methods", "plain,torchtune",
               "--regimes", "r1,r2", "--device", "cpu", "--steps", "3", "--warmup", "1", "--seq", "32",
               "--micro-batch", "1", "--results", str(results), "--report", str(report)]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    records = {record["cell"]: record for record in map(json.loads, results.read_text().splitlines())}
    assert set(records) == {"tiny/plain/r1", "tiny/torchtune/r1", "tiny/plain/r2", "tiny/torchtune/r2"}

    plain = records["tiny/plain/r1"]
    assert plain["status"] == "ok", plain
    assert len(plain["step_times"]) == 3 and len(plain["losses"]) == 3
    assert 10 < plain["loss_first"] < 11  # ~ln(32000): random tokens, random init
    assert plain["tokens_per_step"] == 32 and plain["peak_host_rss_gib"] > 0.2
    assert plain["device"].startswith("CPU") and "torch" in plain["versions"]
    assert records["tiny/plain/r2"]["status"] == "ok" and records["tiny/plain/r2"]["tokens_per_step"] == 256
    assert (records["tiny/torchtune/r1"]["status"], records["tiny/torchtune/r1"]["cause"]) == ("skipped",
                                                                                                 "needs CUDA")
    assert records["tiny/torchtune/r2"]["cause"] == "cannot accumulate gradients (R1 only)"

    assert "===== tiny/plain/r1" in results.with_suffix(".log").read_text()
    markdown = report.read_text()
    assert "| plain PyTorch loop: fp32 weights, bf16 autocast, fused AdamW, no offload | tiny |" in markdown
    assert (tmp_path / "RESULTS.png").exists()
