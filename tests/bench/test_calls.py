"""`python -m bench`: the named subsets and GPU calls resolve to what exists, and a call runs its steps in order,
each under its limit, on the CPU."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import psutil
import pytest

from bench.__main__ import main
from bench.calls import KINDS, CallError, load_calls, load_subsets, run_call, step_paths

ROOT = Path(__file__).resolve().parents[2]
CALLS = load_calls()
SUBSETS = load_subsets()


def test_list_names_every_call_and_subset_on_one_line_each(capsys):
    assert main(["list"]) == 0
    subsets, calls = capsys.readouterr().out.split("\ncalls (python -m bench call NAME):\n")
    for names, printed in ((SUBSETS, subsets.splitlines()[1:]), (CALLS, calls.splitlines())):
        assert [line.split()[0] for line in printed] == list(names)
    assert not set(SUBSETS) & set(CALLS)  # one name, one thing


@pytest.mark.parametrize("name", sorted(CALLS))
def test_each_call_s_steps_resolve_to_files_that_exist(name):
    call = CALLS[name]
    assert call.about and call.steps
    for step in call.steps:
        assert step.kind in KINDS
        for path in step_paths(step):
            assert (ROOT / path).exists(), f"{name}/{step.name}: {path}"
        if step.kind == "cells" and step.spec["cells"]:
            assert step.spec["cells"] in SUBSETS, f"{name}/{step.name}"


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_dry_run_prints_the_setup_and_every_step_s_command(name, capsys):
    assert main(["call", name, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    call = CALLS[name]
    assert printed.startswith(f"source bench/device_setup.sh {call.setup}\n")
    for step in call.steps:
        assert f"# {step.name}" in printed
    assert not re.search(r"\{(OUT|until:[0-9.]+|[A-Z_]+)\}", printed), printed  # every placeholder filled in


def test_a_dry_run_shows_limits_substitutions_and_the_arguments_after_the_separator(capsys):
    main(["call", "matrix", "--dry-run", "--", "--sizes", "3.6b", "--probe"])
    printed = capsys.readouterr().out
    assert ("timeout" not in printed and "python3 -m bench run --regimes r1 --deadline-s 540 --results "
            "/tmp/out/results.jsonl --sizes 3.6b --probe >> /tmp/out/run.out 2>&1") in printed
    main(["call", "finetune_8b", "--dry-run", "--only", "create"])
    printed = capsys.readouterr().out
    assert "timeout 100 python3 -m bench.studies.finetune_8b create --folder /tmp/finetune_8b/pretrained" in printed
    assert "# auto_random" not in printed
    main(["call", "gpu_tests", "--dry-run", "--set", "TESTS=tests/test_losses.py tests/backends"])
    assert "-m gpu --durations=15 tests/test_losses.py tests/backends >>" in capsys.readouterr().out


def test_every_subset_is_a_valid_selection_of_run_options(tmp_path, monkeypatch, capsys):
    from bench import run

    for name in SUBSETS:
        monkeypatch.setattr(sys, "argv", ["run", *sys_args(name), "--list", "--results", str(tmp_path / "none.jsonl")])
        run.main()
        assert " cells, " in capsys.readouterr().out, name


def sys_args(name: str) -> list[str]:
    from bench.calls import subset_arguments

    return subset_arguments(name, SUBSETS)


def test_run_takes_a_subset_name_and_options_on_top(tmp_path, capsys):
    main(["run", "device_1.5b", "--steps", "3", "--list", "--results", str(tmp_path / "none.jsonl")])
    printed = capsys.readouterr().out
    assert "1.5b/single_gpu_offload_device/r1" in printed and "r2" not in printed.split(" cells, ")[0]
    with pytest.raises(SystemExit, match="no subset 'nope'"):
        main(["run", "nope"])


def write_calls(tmp_path: Path, text: str) -> dict:
    path = tmp_path / "calls.yaml"
    path.write_text(text)
    return load_calls(path)


def test_deepspeed_op_builds_never_get_a_time_limit(tmp_path):
    with pytest.raises(CallError, match="without a time limit"):
        write_calls(tmp_path, "calls:\n  c:\n    steps:\n      - build_ops: [CPUAdamBuilder]\n        timeout_s: 60\n")
    with pytest.raises(CallError, match="one of"):
        write_calls(tmp_path, "calls:\n  c:\n    steps:\n      - study: x\n        pytest: [tests]\n")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_call_runs_its_steps_in_order_each_under_its_limit(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    calls = write_calls(tmp_path, f"""
calls:
  c:
    setup: none
    params: {{WORDS: "b c"}}
    steps:
      - name: first
        python: "import sys; print('args', sys.argv[1:])"
        args: [a, "{{WORDS}}", "{{OUT}}/x"]
      - name: slow
        python: |
          import subprocess, sys, time
          child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
          print("child", child.pid, flush=True)
          time.sleep(60)
        timeout_s: 1
      - name: late
        python: "print('never')"
        skip_after_s: 0
      - name: no_time_left
        python: "print('never')"
        until_s: 1
        min_s: 30
      - name: table
        summary: "{tmp_path}/results.jsonl"
        versus: plain
""")
    (tmp_path / "results.jsonl").write_text('{"cell": "1b/plain/r1", "status": "ok", "tokens_per_s": 100}\n'
                                            '{"cell": "1b/ours/r1", "status": "ok", "tokens_per_s": 150}\n')
    started = time.monotonic()
    assert run_call(calls["c"]) == 1
    assert time.monotonic() - started < 30  # the slow step was stopped at its limit, with the process it started
    child = int((tmp_path / "out" / "slow.log").read_text().split()[1])
    # Signals arrive asynchronously: the process the step started is gone (or a zombie) within seconds.
    deadline = time.monotonic() + 10
    while not _gone(child):
        assert time.monotonic() < deadline, "the step's child outlived its group's kill"
        time.sleep(0.05)
    printed = capsys.readouterr().out
    assert f"args ['a', 'b', 'c', '{tmp_path}/out/x']" in printed
    assert "== slow: exit timed out at 1 s" in printed
    assert "== late: skipped" in printed and "== no_time_left: skipped" in printed and "never" not in printed
    assert "'vs_plain': 1.5" in printed and (tmp_path / "out" / "first.log").exists()


def test_only_and_skip_name_steps_of_the_call(tmp_path):
    calls = write_calls(tmp_path, "calls:\n  c:\n    setup: none\n    steps:\n      - {name: a, python: pass}\n")
    with pytest.raises(CallError, match="has no step 'b'"):
        run_call(calls["c"], dry_run=True, only=["b"])


def test_a_call_keeps_what_the_device_setup_exports(tmp_path, monkeypatch, capsys):
    setup = tmp_path / "setup.sh"
    setup.write_text('[[ $1 == package ]] || return 1\necho "installing" \nexport BENCH_TEST_MODE=$1\n')
    monkeypatch.setattr("bench.calls.SETUP", str(setup))
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    calls = write_calls(tmp_path, "calls:\n  c:\n    setup: package\n    steps:\n"
                                  "      - name: a\n"
                                  "        python: \"import os; print('mode', os.environ['BENCH_TEST_MODE'])\"\n"
                                  "  d:\n    setup: checkout\n    steps:\n      - {name: a, python: pass}\n")
    assert run_call(calls["c"]) == 0
    assert "mode package" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="failed"):
        run_call(calls["d"])


RIVALS = sorted(name for name in CALLS if name.startswith("rivals_"))


def test_the_rivals_calls_exist():
    assert RIVALS == ["rivals_14b_r1_r2", "rivals_3.6b", "rivals_3.6b_deepspeed", "rivals_3.6b_r2",
                      "rivals_3.6b_r2_deepspeed", "rivals_8b_r1", "rivals_8b_r2"]


@pytest.mark.parametrize("name", RIVALS)
def test_a_rivals_call_measures_our_reference_row_first_and_prints_ratio_tables_of_its_own_results(name, capsys):
    assert main(["call", name, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    cells = [line for line in lines if " -m bench run " in line]
    tables = [line for line in lines if " -m bench.rivals_table " in line]
    assert cells and tables
    steps = CALLS[name].steps
    assert steps[-1].spec.get("module") == "bench.rivals_table"  # the tables last, after every cell
    written = set()
    for line in cells:
        limit = re.match(r"timeout (\d+) ", line)
        deadline = re.search(r"--deadline-s (\d+)", line)
        assert limit and deadline and int(deadline.group(1)) < int(limit.group(1)), line  # the run records its cells
        written.add(re.search(r"--results (\S+)", line).group(1))
    ours = set()
    for line in tables:
        read, rows = re.search(r"rivals_table (\S+) --ours (\S+)", line).groups()
        assert read in written, line
        ours |= set(rows.split(","))
    for step in steps:
        if step.kind == "cells":  # the deadline stops starting cells: one of the rows the tables divide by goes first
            assert SUBSETS[step.spec["cells"]]["methods"][0] in ours, step.name


def test_deepspeed_s_cpu_adam_is_built_before_the_rivals_cells_without_a_time_limit(capsys):
    main(["call", "rivals_3.6b_deepspeed", "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    build = next(index for index, line in enumerate(lines) if "build-ops CPUAdamBuilder" in line)
    assert not lines[build].startswith("timeout")
    assert build < next(index for index, line in enumerate(lines) if " -m bench run " in line)
