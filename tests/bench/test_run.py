"""The subprocess machinery: every way a cell can end becomes a status and a cause, never a gap."""

from __future__ import annotations

import json
import sys
import time

import pytest

from bench.matrix import DEFAULT_CONFIG, expand, load_config
from bench.run import ChildOutcome, cell_record, classify, main, parse_result, run_child, time_limit


def outcome(returncode=0, result=None, tail="", timed_out=False, peak_rss_bytes=0):
    return ChildOutcome(returncode, timed_out, result, tail, peak_rss_bytes, wall_s=1.0)


@pytest.mark.parametrize("case, expected", [
    (outcome(result={"ok": True}), ("ok", None)),
    (outcome(-9, timed_out=True), ("timeout", "timeout after 420 s")),
    (outcome(-9), ("killed", "killed by SIGKILL, no Python error (host OOM?)")),
    (outcome(137), ("killed", "killed by SIGKILL, no Python error (host OOM?)")),
    (outcome(1, {"ok": False, "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"}),
     ("gpu_oom", "GPU OOM: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")),
    (outcome(1, {"ok": False, "error": "RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried"}),
     ("host_oom", "host OOM: RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried")),
    (outcome(1, {"ok": False, "error": "ModuleNotFoundError: No module named 'lightning_offload'"}),
     ("unavailable", "not available: ModuleNotFoundError: No module named 'lightning_offload'")),
    (outcome(1, {"ok": False, "skipped": "needs CUDA"}), ("skipped", "needs CUDA")),
    (outcome(1, {"ok": False, "error": "ValueError: bad config\nmore"}), ("error", "ValueError: bad config")),
    (outcome(1, {"ok": False, "error": "PredictedTimeout: fsdp + adamw8bit + checkpointing=full at 133 s/step needs "
                                       "~1064 s for 8 steps, 380 s left", "plan": "fsdp + adamw8bit"}),
     ("timeout", "predicted timeout: fsdp + adamw8bit + checkpointing=full at 133 s/step needs ~1064 s for 8 steps, "
                 "380 s left")),
    (outcome(-11, tail="Fatal Python error"), ("crashed", "crashed: SIGSEGV")),
    (outcome(-6, tail="terminate called after throwing\nRuntimeError: CUDA error: out of memory\n"),
     ("gpu_oom", "GPU OOM: see the log")),
    (outcome(2, tail="usage: cell.py\ncell.py: error: unrecognized arguments: --x\n"),
     ("crashed", "exited 2 without a result: cell.py: error: unrecognized arguments: --x")),
])
def test_every_ending_is_classified(case, expected):
    assert classify(case, 420) == expected


def test_a_refusal_keeps_what_would_help():
    refusal = ("PlanDoesNotFit: No plan fits this machine (79 GiB GPU, 124 GiB host RAM, 10% of each kept free) for "
               "32.76B parameters. Nearest: stream + adamw8bit_fused + checkpointing=full, 0 resident blocks: GPU "
               "short by 12.6 GiB, host RAM short by 2.8 GiB (needs 83.9 GiB GPU, 123.1 GiB host). What would "
               "help: without gradient accumulation (`accumulate_grad_batches=1`, 8192 tokens per step) stream + "
               "adamw8bit_fused + checkpointing=full, 53 resident blocks fits: accumulating 8 micro-batches keeps "
               "every gradient until the step (61.0 GiB for stream + adamw8bit_fused + checkpointing=full).")
    assert classify(outcome(1, {"ok": False, "error": refusal}), 420) == ("error", refusal)


def test_the_last_complete_result_line_counts():
    output = 'RESULT {"ok": false}\nnoise\nRESULT {"ok": true, "x": 1}\n'
    assert parse_result(output) == {"ok": True, "x": 1}
    assert parse_result('RESULT {"ok": tr') is None
    assert parse_result("Traceback ...") is None


def _child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_child_killed_by_sigkill_is_recorded_with_its_memory(tmp_path):
    log = tmp_path / "cells.log"
    code = "import os, signal, time; x = bytearray(200 * 2**20); time.sleep(0.5); os.kill(os.getpid(), signal.SIGKILL)"
    result = run_child(_child(code), 30, log, "killed")
    assert classify(result, 30)[0] == "killed"
    assert result.peak_rss_bytes > 200 * 2**20
    assert "===== killed:" in log.read_text()


def test_a_hung_child_and_its_children_are_killed_at_the_time_limit(tmp_path):
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
           "print('started', flush=True); time.sleep(60)"
    started = time.monotonic()
    result = run_child(_child(code), 1.5, tmp_path / "cells.log", "hung")
    assert time.monotonic() - started < 10
    assert classify(result, 1.5) == ("timeout", "timeout after 2 s")
    assert "started" in result.tail


def test_a_child_result_is_parsed_from_its_own_part_of_a_shared_log(tmp_path):
    log = tmp_path / "cells.log"
    run_child(_child("print('RESULT ' + '{\"ok\": false, \"error\": \"old\"}')"), 30, log, "first")
    result = run_child(_child("import json; print('RESULT ' + json.dumps({'ok': True}))"), 30, log, "second")
    assert result.result == {"ok": True} and result.returncode == 0


def test_time_limit_allows_for_the_deepspeed_build_and_respects_the_deadline(monkeypatch):
    config = load_config()
    monkeypatch.setattr("bench.run.deepspeed_cpu_adam_built", lambda: False)
    assert time_limit(100, False, config, None) == 100
    assert time_limit(100, True, config, None) == 100 + config.deepspeed_build_s
    now = time.monotonic()
    assert time_limit(100, False, config, now + 70) == pytest.approx(70, abs=1)
    assert time_limit(100, False, config, now + 30) is None  # too little left to build a model
    assert time_limit(100, True, config, now + 120) is None  # would kill the DeepSpeed build
    monkeypatch.setattr("bench.run.deepspeed_cpu_adam_built", lambda: True)
    assert time_limit(100, True, config, None) == 100


def test_a_record_carries_the_cell_its_result_and_the_larger_rss_peak():
    cell = expand(load_config(), sizes=["1.5b"], methods=["deepspeed_zenflow"], regimes=["r2"])[0]
    child = {"ok": True, "step_s_median": 0.3, "peak_rss_self_gib": 9.5}
    record = cell_record(cell, "ok", None, outcome(result=child, peak_rss_bytes=8 * 2**30), timeout_s=420)
    assert record["cell"] == "1.5b/deepspeed_zenflow/r2" and record["note"] == "stale updates"
    assert (record["accumulate"], record["tokens_per_step"], record["cost"]) == (8, 65536, "zenflow")
    assert record["params"] == pytest.approx(1.5e9, rel=0.01)
    assert record["peak_host_rss_gib"] == 9.5 and record["step_s_median"] == 0.3 and "ok" not in record
    json.dumps(record)


def test_main_records_the_probe_then_every_cell_in_order(tmp_path, monkeypatch):
    def fake_child(argv, timeout_s, log_path, title):
        result = {"ok": True, "bf16_matmul_TFLOPs": 700} if title == "probe" else {"ok": True, "step_s_median": 1.0}
        return outcome(result=result, peak_rss_bytes=2**30)

    results = tmp_path / "results.jsonl"
    monkeypatch.setattr("bench.run.run_child", fake_child)
    monkeypatch.setattr(sys, "argv", ["run.py", "--probe", "--sizes", "1.5b", "--methods", "plain,torchtune",
                                      "--results", str(results)])
    main()
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [record.get("cell", record["kind"]) for record in records] == [
        "probe", "1.5b/plain/r1", "1.5b/torchtune/r1", "1.5b/plain/r2", "1.5b/torchtune/r2"]
    assert records[0]["bf16_matmul_TFLOPs"] == 700 and "ok" not in records[0]
    assert [record["status"] for record in records[1:]] == ["ok", "ok", "ok", "skipped"]
    assert all(record["command"].startswith("python -m bench run --probe") for record in records)


def test_a_partial_probe_runs_only_the_named_measurements_without_the_deepspeed_allowance(tmp_path, monkeypatch):
    calls = []

    def fake_child(argv, timeout_s, log_path, title):
        calls.append((argv, timeout_s))
        return outcome(result={"ok": True, "sdpa_causal_ms_8b": 40.0}, peak_rss_bytes=2**30)

    results = tmp_path / "results.jsonl"
    monkeypatch.setattr("bench.run.run_child", fake_child)
    monkeypatch.setattr("bench.run.deepspeed_cpu_adam_built", lambda: False)
    monkeypatch.setattr(sys, "argv", ["run.py", "--probe", "model_matmuls,model_attention", "--sizes", "1.5b",
                                      "--methods", "plain", "--regimes", "r1", "--results", str(results)])
    main()
    (probe_argv, probe_limit), _cell = calls
    assert probe_argv[-2:] == ["--only", "model_matmuls,model_attention"]
    assert probe_limit == load_config(DEFAULT_CONFIG).probe_timeout_s
    assert json.loads(results.read_text().splitlines()[0])["sdpa_causal_ms_8b"] == 40.0


def test_known_failures_in_the_results_are_recorded_as_inferred_skips(tmp_path, monkeypatch):
    ran = []

    def fake_child(argv, timeout_s, log_path, title):
        ran.append(title)
        return outcome(result={"ok": True, "step_s_median": 1.0}, peak_rss_bytes=2**30)

    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps({"kind": "cell", "cell": "8b/plain/r1", "size": "8b", "method": "plain",
                                   "regime": "r1", "micro_batch": 4, "seq": 2048, "accumulate": 1,
                                   "status": "gpu_oom", "cause": "GPU OOM: ...",
                                   "finished_at": "2026-11-23T10:00:00"}) + "\n")
    monkeypatch.setattr("bench.run.run_child", fake_child)
    monkeypatch.setattr(sys, "argv", ["run.py", "--sizes", "3.6b,14.8b", "--methods", "plain", "--regimes", "r1",
                                      "--skip-known-failures", "--results", str(results)])
    main()
    records = [json.loads(line) for line in results.read_text().splitlines()][1:]
    assert ran == ["3.6b/plain/r1"]
    assert records[1]["status"] == "skipped" and records[1]["inferred_from"] == "8b/plain/r1"
    assert "out of GPU memory at 8b/plain/r1" in records[1]["cause"]


def test_a_cell_is_told_the_time_limit_it_is_killed_at(tmp_path, monkeypatch):
    calls = []

    def fake_child(argv, timeout_s, log_path, title):
        calls.append((argv, timeout_s))
        return outcome(result={"ok": True, "step_s_median": 1.0}, peak_rss_bytes=2**30)

    monkeypatch.setattr("bench.run.run_child", fake_child)
    monkeypatch.setattr(sys, "argv", ["run.py", "--sizes", "1.5b", "--methods", "plain", "--regimes", "r1",
                                      "--timeout-s", "123", "--results", str(tmp_path / "results.jsonl")])
    main()
    [(argv, timeout_s)] = calls
    assert timeout_s == 123 and argv[argv.index("--time-limit-s") + 1] == "123.0"


def _record_line(cell: str, status: str, **figures) -> str:
    size, method, regime = cell.split("/")
    return json.dumps({"kind": "cell", "cell": cell, "size": size, "method": method, "regime": regime,
                       "micro_batch": 4, "seq": 2048, "accumulate": 8 if regime == "r2" else 1, "steps": 8,
                       "params": 3.6e9, "status": status, "cause": None, "finished_at": "2026-11-23T10:00:00",
                       **figures}) + "\n"


def test_a_cell_the_call_s_deadline_cuts_is_not_run_not_a_timeout_of_its_method(tmp_path, monkeypatch):
    monkeypatch.setattr("bench.run.run_child", lambda argv, timeout_s, log_path, title: outcome(-9, timed_out=True))
    monkeypatch.setattr(sys, "argv", ["run.py", "--sizes", "1.5b", "--methods", "plain", "--regimes", "r1",
                                      "--deadline-s", "100", "--results", str(tmp_path / "results.jsonl")])
    main()
    record = json.loads((tmp_path / "results.jsonl").read_text())
    assert record["status"] == "not_run"
    assert record["cause"].startswith("not run: out of session time: cut at 100 s of its 420 s (timeout after")


def test_a_cell_whose_estimate_exceeds_the_time_left_is_not_started(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr("bench.run.run_child", lambda argv, timeout_s, log_path, title: ran.append(title) or
                        outcome(result={"ok": True, "step_s_median": 1.0}))
    results = tmp_path / "results.jsonl"
    # 3.6B plain measured at 40 s/step: 8 steps at 1.5B would take ~130 s, more than this 100 s call has.
    results.write_text(_record_line("3.6b/plain/r1", "ok", step_s_mean=40.0, wall_s=330.0) +
                       _record_line("1.5b/torchtune/r1", "ok", step_s_mean=1.0, wall_s=20.0))
    monkeypatch.setattr(sys, "argv", ["run.py", "--sizes", "1.5b", "--methods", "plain,torchtune", "--regimes", "r1",
                                      "--deadline-s", "100", "--results", str(results)])
    main()
    plain, torchtune = [json.loads(line) for line in results.read_text().splitlines()[2:]]
    assert ran == ["1.5b/torchtune/r1"] and torchtune["status"] == "ok"
    assert plain["status"] == "not_run" and "by its method's measured cells" in plain["cause"]


def test_a_failure_measured_in_the_call_answers_its_larger_cells_at_once(tmp_path, monkeypatch):
    ran = []

    def fake_child(argv, timeout_s, log_path, title):
        ran.append(title)
        return outcome(-9)  # killed by the kernel

    results = tmp_path / "results.jsonl"
    monkeypatch.setattr("bench.run.run_child", fake_child)
    monkeypatch.setattr(sys, "argv", ["run.py", "--sizes", "8b,14.8b", "--methods", "lightning_fsdp_cpu_offload",
                                      "--skip-known-failures", "--results", str(results)])
    main()
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert ran == ["8b/lightning_fsdp_cpu_offload/r1"]
    assert [record["inferred_from"] for record in records[1:]] == ["8b/lightning_fsdp_cpu_offload/r1"] * 3


def test_unmeasured_runs_only_what_the_results_do_not_answer_and_list_runs_nothing(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr("bench.run.run_child", lambda argv, timeout_s, log_path, title: ran.append(title) or
                        outcome(result={"ok": True, "step_s_median": 1.0}))
    known = tmp_path / "known.jsonl"
    known.write_text(_record_line("1.5b/plain/r1", "ok", step_s_mean=0.25, wall_s=19.0) +
                     _record_line("1.5b/torchtune/r1", "not_run"))
    argv = ["run.py", "--sizes", "1.5b", "--methods", "plain,torchtune", "--regimes", "r1",
            "--unmeasured", str(known), "--results", str(tmp_path / "results.jsonl")]
    monkeypatch.setattr(sys, "argv", [*argv, "--list"])
    main()
    listed = capsys.readouterr().out.splitlines()
    monkeypatch.setattr(sys, "argv", [*argv, "--list", "--deadline-s", "500"])
    main()
    assert capsys.readouterr().out.splitlines()[0] == "call 1: ~420 s"
    assert ran == [] and listed[0].split() == ["1.5b/torchtune/r1", "?"]
    assert listed[-1].startswith("1 cells, ~420 s (1 without an estimate")  # counted at its time limit
    monkeypatch.setattr(sys, "argv", argv)
    main()
    assert ran == ["1.5b/torchtune/r1"]


@pytest.mark.parametrize("predicted_step_s, expected", [(100.0, "timeout"), (10.0, "not_run")])
def test_a_predicted_timeout_under_the_deadline_stands_only_if_the_cell_s_own_limit_would_not_fit_it_either(
        tmp_path, monkeypatch, predicted_step_s, expected):
    # 8 steps: 800 s are beyond the cell's own 420 s, so a later call would only repeat the refusal; 80 s fit in it.
    error = f"PredictedTimeout: fsdp + adamw8bit at {predicted_step_s} s/step needs ~ s for 8 steps, 40 s left"
    monkeypatch.setattr("bench.run.run_child", lambda argv, timeout_s, log_path, title: outcome(
        1, {"ok": False, "error": error, "predicted_step_s": predicted_step_s}))
    monkeypatch.setattr(sys, "argv", ["run.py", "--sizes", "8b", "--methods", "single_gpu_offload_fsdp",
                                      "--regimes", "r1", "--deadline-s", "100",
                                      "--results", str(tmp_path / "results.jsonl")])
    main()
    record = json.loads((tmp_path / "results.jsonl").read_text())
    assert record["status"] == expected
    if expected == "timeout":
        assert record["cause"].endswith("(and beyond its own 420 s limit)")


def test_a_child_above_the_profiles_host_memory_is_killed_as_the_smaller_machine_would(tmp_path):
    code = "import time; x = bytearray(400 * 2**20); x[::4096] = b'x' * len(x[::4096]); time.sleep(30)"
    started = time.monotonic()
    result = run_child(_child(code), 60, tmp_path / "cells.log", "over", host_limit_bytes=200 * 2**20)
    assert result.over_host_limit and time.monotonic() - started < 30
    status, cause = classify(result, 60)
    assert status == "killed" and cause.startswith("killed: host RSS") and "above the profile's host memory" in cause


def test_a_profile_runs_its_cells_as_the_smaller_machine_into_its_own_results(tmp_path, monkeypatch):
    runs = []

    def fake_child(argv, timeout_s, log_path, title, host_limit_bytes=None):
        runs.append((title, argv, host_limit_bytes))
        return outcome(result={"ok": True, "step_s_median": 1.0}, peak_rss_bytes=2**30)

    monkeypatch.setattr("bench.run.run_child", fake_child)
    monkeypatch.setattr("bench.run.BENCH", tmp_path)
    profile = load_config().profiles["24gb_64gib"]
    monkeypatch.setattr(sys, "argv", ["run.py", "--profile", "24gb_64gib", "--sizes", "8b",
                                      "--methods", "single_gpu_offload_auto", "--regimes", "r1"])
    main()
    [(title, argv, host_limit)] = runs
    assert title == "8b/single_gpu_offload_auto/r1@24gb_64gib"
    assert argv[argv.index("--profile") + 1] == "24gb_64gib" and host_limit == profile.host_memory_gib * 2**30
    [record] = [json.loads(line) for line in (tmp_path / "results_24gb_64gib.jsonl").read_text().splitlines()]
    assert record["profile"] == "24gb_64gib" and record["profile_gpu_gib"] == profile.gpu_memory_gib
