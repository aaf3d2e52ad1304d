"""Rendering: runs merged from a fixture results file into per-regime tables, the probe, the limits and a plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.report import as_module_command, load, render_markdown, write_report

FIXTURE = Path(__file__).parent / "fixtures" / "results.jsonl"


@pytest.fixture(scope="module")
def merged():
    return load([FIXTURE])


def _row(markdown: str, label_start: str, size: str, regime: str = "r1") -> list[str]:
    section = markdown.split(f"## {regime.upper()}: ")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith(f"| {label_start}") and f"| {size} |" in line]
    assert len(rows) == 1, rows
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


def test_newest_record_wins_but_not_run_never_hides_a_measurement(merged):
    probe, cells = merged
    assert probe["bf16_matmul_TFLOPs"] == 773
    assert cells["8b/plain/r1"]["status"] == "gpu_oom"  # measured later than the fixture's ok record
    assert cells["1.5b/deepspeed_zenflow/r1"]["status"] == "ok"  # a later session that did not get to it
    assert len(cells) == 8


def test_tables_per_regime_with_limits_and_causes(merged):
    markdown = render_markdown(*merged, plot_name="RESULTS.png")
    assert "## R1: 8192 tokens per optimizer step (micro-batch 4 x 2048, no accumulation)" in markdown
    assert "## R2: 65536 tokens per optimizer step (micro-batch 4 x 2048, accumulate 8)" in markdown
    plain = _row(markdown, "plain PyTorch loop", "3.6b")
    assert plain[2:6] == ["0.600", "0.610", "13653", "262"]
    assert plain[6] == "0.30 (compute)" and plain[7] == "1.98x"
    assert plain[8:12] == ["59.0 GiB", "61.0 GiB", "2.0 GiB", "11.93 -> 11.9"]
    zenflow = _row(markdown, "DeepSpeed ZenFlow", "1.5b")
    assert zenflow[0].endswith("(stale updates)") and zenflow[3] == "0.520"
    killed = _row(markdown, "Lightning `deepspeed_stage_3_offload`", "8b")
    assert killed[2] == "killed by SIGKILL, no Python error (host OOM?)" and killed[10] == "118.5 GiB"
    assert _row(markdown, "single_gpu_offload", "3.6b")[2].startswith("not available: ModuleNotFoundError")
    assert _row(markdown, "torchtune", "3.6b")[2] == "0.660"
    skipped = _row(markdown, "torchtune", "3.6b", "r2")
    assert skipped[2] == "cannot accumulate gradients (R1 only)" and skipped[6] == ""  # no limit for a cell not run
    assert _row(markdown, "DeepSpeed ZeRO-2", "3.6b", "r2")[6:8] == ["2.18 (compute)", "4.13x"]


def test_header_probe_and_commands(merged):
    markdown = render_markdown(*merged)
    assert "- Device: NVIDIA H100 80GB HBM3" in markdown
    assert "torch 2.11.0" in markdown and "2026-11-24" in markdown
    assert "| both ways at once, pinned (GB/s, total) | 78.5 |" in markdown
    assert "| cpu_bnb_8bit | failed: RuntimeError: no CPU kernel |" in markdown
    assert "    python -m bench run --probe" in markdown  # the fixture records `python bench/run.py`


def test_rows_follow_the_method_order_then_size(merged):
    lines = [line for line in render_markdown(*merged).splitlines() if line.startswith("| plain")]
    assert [line.split("|")[2].strip() for line in lines] == ["3.6b", "8b"]


def test_write_report_makes_markdown_and_png(tmp_path):
    out = tmp_path / "RESULTS.md"
    write_report([FIXTURE], out)
    assert "![tokens/s and peak memory per method and size](RESULTS.png)" in out.read_text()
    assert (tmp_path / "RESULTS.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_probe_figures_of_later_calls_join_the_earlier_probe(tmp_path):
    later = tmp_path / "later.jsonl"
    later.write_text('{"kind": "probe", "status": "ok", "finished_at": "2099-01-01T00:00:00+00:00", '
                     '"command": "python -c model_matmuls", "bf16_matmul_TFLOPs_8b": 640}\n'
                     '{"kind": "probe", "status": "failed", "finished_at": "2099-01-02T00:00:00+00:00", '
                     '"command": "python bench/probe.py", "bf16_matmul_TFLOPs": 1}\n')
    probe, cells = load([FIXTURE, later])
    assert probe["bf16_matmul_TFLOPs"] == 773 and probe["bf16_matmul_TFLOPs_8b"] == 640
    markdown = render_markdown(probe, cells, plot_name="RESULTS.png")
    assert "| bf16 matmul, the 8b model's own GEMMs at 8192 tokens (TFLOP/s) | 640 |" in markdown
    assert "    python -c model_matmuls" in markdown
    # The 8B cells' compute limit is now at 640 TFLOP/s: 8 x matmul params x 8192 tokens over it.
    assert _row(markdown, "plain", "8b")[6] != _row(render_markdown(*load([FIXTURE]), plot_name="R.png"), "plain", "8b")[6]


def test_a_planner_s_choice_is_charged_at_the_chosen_plan_s_cost():
    from bench.limits import COSTS
    from bench.models import SIZES
    from bench.report import plan_cost

    auto = {"cost": "zero3_offload", "size": "1.5b", "plan": "device + adamw + checkpointing=none",
            "method": "single_gpu_offload_auto"}
    # The module checkpoints every layer itself: the plan's policy does not change the recompute.
    assert plan_cost(auto) == COSTS["gpu_adamw"]
    assert plan_cost({**auto, "plan": None}) == COSTS["zero3_offload"]
    host_adam = {"cost": "host_adam", "size": "1.5b", "plan": "host_adam + adamw + checkpointing=none, 16 blocks' "
                 "state on the GPU", "method": "single_gpu_offload_host_adam"}
    shape = SIZES["1.5b"]
    # Every block's state on the GPU: the host updates the embedding, the output layer and the final norm.
    outside_blocks = 2 * shape.input_embedding_params + shape.hidden
    assert plan_cost(host_adam).updated_share == pytest.approx(outside_blocks / shape.params)
    assert plan_cost(host_adam).d2h_per_step == pytest.approx(4 * outside_blocks / shape.params)


@pytest.mark.parametrize(("policy", "share"), [("none", 0.0), ("full", 1.0), ("every_4", 0.25), ("offload", 0.0)])
def test_a_plan_that_checkpoints_fewer_blocks_is_charged_less_recompute(policy, share):
    from bench.report import plan_cost

    record = {"cost": "gpu_8bit_adamw", "size": "1.5b", "plan": f"gpu_8bit + adamw8bit_fused + checkpointing={policy}",
              "method": "single_gpu_offload_gpu_8bit"}  # its module leaves checkpointing to the strategy
    assert plan_cost(record).recompute_share == share


def test_a_plan_that_checkpoints_the_first_blocks_is_charged_their_share_of_the_recompute():
    from bench.models import SIZES
    from bench.report import plan_cost

    blocks = SIZES["14.8b"].layers
    record = {"cost": "gpu_8bit_adamw", "size": "14.8b", "method": "single_gpu_offload_gpu_8bit",
              "plan": f"gpu_8bit + adamw8bit_fused + activation_checkpointing=first_{blocks - 4}"}
    assert plan_cost(record).recompute_share == (blocks - 4) / blocks


def test_a_skip_inferred_later_never_hides_a_measurement(tmp_path):
    measured = {"kind": "cell", "cell": "14.8b/plain/r1", "status": "gpu_oom", "finished_at": "2026-11-23T10:00:00"}
    inferred = {"kind": "cell", "cell": "14.8b/plain/r1", "status": "skipped", "inferred_from": "8b/plain/r1",
                "finished_at": "2026-11-24T10:00:00"}
    results = tmp_path / "results.jsonl"
    results.write_text("\n".join(json.dumps(record) for record in (measured, inferred)))
    assert load([results])[1]["14.8b/plain/r1"]["status"] == "gpu_oom"
    results.write_text(json.dumps(inferred))
    assert load([results])[1]["14.8b/plain/r1"]["status"] == "skipped"


def _fsdp_record(status: str, finished_at: str, **figures) -> dict:
    from bench.matrix import expand, load_config

    [cell] = expand(load_config(), sizes=["8b"], methods=["single_gpu_offload_fsdp"], regimes=["r1"])
    return cell.record(status, figures.pop("cause", None)) | {"finished_at": finished_at, "command": "c"} | figures


def test_a_measurement_out_of_date_shows_as_such_below_any_current_record(tmp_path):
    from bench.matrix import Superseded

    rules = [Superseded(method="single_gpu_offload_fsdp", before="2026-11-24T00:00:00+00:00", why="before the fix")]
    old = _fsdp_record("killed", "2026-11-23T23:55:46+00:00", cause="killed by SIGKILL", peak_host_rss_gib=123.6)
    later_gap = _fsdp_record("not_run", "2026-11-25T10:00:00+00:00", cause="not run: out of session time")
    results = tmp_path / "results.jsonl"
    results.write_text("\n".join(json.dumps(record) for record in (old, later_gap)))
    _, cells = load([results], rules)
    record = cells["8b/single_gpu_offload_fsdp/r1"]
    assert record["status"] == "killed" and record["superseded"] == "before the fix"
    row = _row(render_markdown(None, cells), "single_gpu_offload", "8b")
    assert row[2] == "out of date, to be measured again (before the fix; was: killed by SIGKILL)"
    assert row[10] == ""  # its old peaks are not the row's figures
    new = _fsdp_record("timeout", "2026-11-25T11:00:00+00:00", cause="predicted timeout: ...")
    results.write_text("\n".join(json.dumps(record) for record in (new, old)))
    assert load([results], rules)[1]["8b/single_gpu_offload_fsdp/r1"]["status"] == "timeout"


def test_a_skip_inferred_from_a_measurement_out_of_date_is_out_of_date_too(tmp_path):
    from bench.matrix import Superseded

    rules = [Superseded(method="single_gpu_offload_fsdp", before="2026-11-24T00:00:00+00:00", why="before the fix")]
    old = _fsdp_record("killed", "2026-11-23T23:55:46+00:00", cause="killed by SIGKILL")
    inferred = old | {"cell": "14.8b/single_gpu_offload_fsdp/r1", "size": "14.8b", "status": "skipped",
                      "inferred_from": old["cell"], "finished_at": "2026-11-25T10:00:00+00:00"}
    results = tmp_path / "results.jsonl"
    results.write_text("\n".join(json.dumps(record) for record in (old, inferred)))
    cells = load([results], rules)[1]
    assert cells[inferred["cell"]]["superseded"] == f"inferred from {old['cell']}, itself out of date"
    assert "superseded" not in load([results], [])[1][inferred["cell"]]
    # Measured again and fitting: the inference no longer holds either.
    ran = _fsdp_record("ok", "2026-11-26T10:00:00+00:00", step_s_median=2.0)
    results.write_text("\n".join(json.dumps(record) for record in (old, inferred, ran)))
    assert load([results], [])[1][inferred["cell"]]["superseded"] == f"inferred from {old['cell']}, which has run since"
    # Run since and timed out: a timeout answers the larger cell as the kill did.
    timed_out = _fsdp_record("timeout", "2026-11-26T10:00:00+00:00", cause="timeout after 420 s", timeout_s=420)
    results.write_text("\n".join(json.dumps(record) for record in (old, inferred, timed_out)))
    assert "superseded" not in load([results], [])[1][inferred["cell"]]


def test_the_report_lists_the_configured_cells_not_measured_yet_and_counts_every_kind(tmp_path):
    from bench.matrix import load_config

    out = tmp_path / "MATRIX.md"
    write_report([FIXTURE], out)
    markdown = out.read_text()
    methods = len(load_config().default_methods)
    sizes, regimes = {"1.5b", "3.6b", "8b"}, 2  # those the fixture's records cover
    assert markdown.count("| not measured yet |") == methods * len(sizes) * regimes - len(load([FIXTURE])[1])
    assert _row(markdown, 'single_gpu_offload (backend="fsdp")', "1.5b")[2] == "not measured yet"
    assert "- Cells: " in markdown and "not measured yet" in markdown.split("- Cells: ")[1].splitlines()[0]


def test_recorded_commands_render_as_they_are_typed_today():
    assert as_module_command("python bench/run.py --sizes 8b") == "python -m bench run --sizes 8b"
    assert as_module_command("python bench/probe.py") == "python -m bench probe"
    assert as_module_command("python3 -c x  (last step of bash bench/calls/stream_8b.sh)") == \
        "python3 -c x  (last step of python -m bench call stream_8b)"
    assert as_module_command("python -m bench run --probe") == "python -m bench run --probe"
