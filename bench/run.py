"""Runs the benchmark matrix, one subprocess per cell, and appends one JSON line per cell to a results file.

    python -m bench run --probe                                   # the probe, then the whole matrix
    python -m bench run --sizes 1.5b,3.6b --methods plain,torchtune --regimes r1 --results bench/results.jsonl
    python -m bench report bench/results.jsonl                    # tables and plot from every run so far

Each cell runs in its own process under a time limit, so a crash, an OOM, a kill by the kernel or a hang is that
cell's recorded result (with its cause), its memory peaks are its own, and a later cell starts on a clean GPU.
Host memory is the peak RSS of the cell's whole process tree, polled here. Several invocations (each under the
device's 10-minute limit) append to one results file; the report keeps the newest record of each cell.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path


import psutil

from bench import GIB, PREDICTION_MARGIN, RESULT_PREFIX, PredictedTimeout
from bench.matrix import (BEYOND_OWN_LIMIT, DEFAULT_CONFIG, Config, PlannedCell, add_override_arguments, expand,
                          load_config, override_arguments, overrides_from, parse_list, skip_known_failures)
from bench.schedule import calls, estimate_s, unmeasured

BENCH = Path(__file__).resolve().parent
# A cell given less time than this cannot build a model and time its steps: it is recorded as not run instead.
MIN_CELL_S = 60.0
# Peak RSS is sampled, so a spike shorter than this can be missed; the cell's own ru_maxrss covers its main process.
RSS_POLL_S = 0.2
GPU_OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError", "CUBLAS_STATUS_ALLOC_FAILED", "CUDA error: out of memory")
HOST_OOM_MARKERS = ("MemoryError", "can't allocate memory", "Cannot allocate memory")
TAIL_CHARS = 4000
PREDICTED_TIMEOUT = f"{PredictedTimeout.__name__}: "


@dataclass(frozen=True)
class ChildOutcome:
    returncode: int
    timed_out: bool
    result: dict | None
    """The child's last RESULT line, or None if it died before printing one."""
    tail: str
    """The end of the child's output (stdout and stderr), for causes the child could not report itself."""
    peak_rss_bytes: int
    wall_s: float
    over_host_limit: bool = False
    """Killed because its process tree held more host memory than the profile's (`run_child`'s `host_limit_bytes`)."""


def tree_rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def parse_result(output: str) -> dict | None:
    lines = [line for line in output.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        return None
    try:
        return json.loads(lines[-1][len(RESULT_PREFIX):])
    except json.JSONDecodeError:  # a line cut short by a kill
        return None


def run_child(argv: list[str], timeout_s: float, log_path: Path, title: str,
              host_limit_bytes: int | None = None) -> ChildOutcome:
    """Runs `argv` in its own session, its output appended to `log_path`; kills the whole group at `timeout_s`, or
    when its process tree holds more than `host_limit_bytes` of host memory (as a smaller machine's kernel would)."""
    with open(log_path, "ab") as log:
        log.write(f"\n===== {title}: {shlex.join(argv)}\n".encode())
        log.flush()
        offset = log.tell()
        started = time.monotonic()
        child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
        peak, timed_out, over_host_limit = 0, False, False
        while child.poll() is None:
            peak = max(peak, tree_rss(child.pid))
            if host_limit_bytes is not None and peak > host_limit_bytes:
                over_host_limit = True
                break
            if time.monotonic() - started > timeout_s:
                timed_out = True
                break
            time.sleep(RSS_POLL_S)
        # Also after a normal exit: leftovers (compiler workers, an engine's helper process) would hold memory
        # into the next cell.
        _kill_group(child.pid)
        returncode = child.wait()
        wall_s = time.monotonic() - started
    with open(log_path, "rb") as log:
        log.seek(offset)
        output = log.read().decode(errors="replace")
    return ChildOutcome(returncode, timed_out, parse_result(output), output[-TAIL_CHARS:], peak, round(wall_s, 1),
                        over_host_limit)


def classify(outcome: ChildOutcome, timeout_s: float) -> tuple[str, str | None]:
    """(status, cause) of a finished child: ok, timeout, killed, gpu_oom, host_oom, unavailable, skipped, crashed,
    error. The cause is what the table prints in place of numbers."""
    result = outcome.result or {}
    if outcome.over_host_limit:
        return "killed", (f"killed: host RSS {outcome.peak_rss_bytes / GIB:.1f} GiB above the profile's host memory "
                          "(the smaller machine's kernel would kill it there)")
    if outcome.timed_out:
        return "timeout", f"timeout after {timeout_s:.0f} s"
    if result.get("ok"):
        return "ok", None
    if result.get("skipped"):
        return "skipped", result["skipped"]
    error = result.get("error", "")
    if error.startswith(PREDICTED_TIMEOUT):
        return "timeout", f"predicted timeout: {_first_line(error.removeprefix(PREDICTED_TIMEOUT))}"
    if not result and outcome.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL):
        return "killed", "killed by SIGKILL, no Python error (host OOM?)"
    evidence = error or outcome.tail
    if any(marker in evidence for marker in GPU_OOM_MARKERS):
        return "gpu_oom", f"GPU OOM: {_first_line(error) or 'see the log'}"
    if any(marker in evidence for marker in HOST_OOM_MARKERS):
        return "host_oom", f"host OOM: {_first_line(error) or 'see the log'}"
    if error.startswith(("ModuleNotFoundError", "ImportError")):
        return "unavailable", f"not available: {_first_line(error)}"
    if error:  # whole, up to a bound: the planner's refusal says what would help at its end
        return "error", _first_line(error, limit=1500)
    if outcome.returncode < 0:
        return "crashed", f"crashed: {signal.Signals(-outcome.returncode).name}"
    last_line = outcome.tail.strip().splitlines()[-1:] or ["no output"]
    return "crashed", f"exited {outcome.returncode} without a result: {last_line[0][:200]}"


def _first_line(text: str, limit: int = 300) -> str:
    return text.strip().splitlines()[0][:limit] if text.strip() else ""


def deepspeed_cpu_adam_built() -> bool:
    """Whether DeepSpeed's JIT-built CPU Adam is in torch's extension cache (where DeepSpeed builds it)."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    return any(root.glob("*/cpu_adam/cpu_adam.so"))


def time_limit(base_s: float, builds_cpu_adam: bool, config: Config, deadline: float | None) -> float | None:
    """The child's time limit, or None if the session's deadline leaves too little to start it."""
    building = builds_cpu_adam and not deepspeed_cpu_adam_built()
    limit = base_s + (config.deepspeed_build_s if building else 0.0)
    if deadline is None:
        return limit
    remaining = deadline - time.monotonic()
    # Never start a DeepSpeed build that the deadline would interrupt: a killed build leaves a lock behind.
    if remaining < (config.deepspeed_build_s if building else MIN_CELL_S):
        return None
    return min(limit, remaining)


def cell_limit(cell: PlannedCell, config: Config, args: argparse.Namespace, deadline: float | None) -> float | None:
    """`time_limit` of this cell under this run's options."""
    return time_limit(args.timeout_s or config.timeout_s, cell.method.builds_deepspeed_cpu_adam, config, deadline)


def cell_record(cell: PlannedCell, status: str, cause: str | None, outcome: ChildOutcome | None = None,
                timeout_s: float | None = None) -> dict:
    record = cell.record(status, cause)
    if outcome is not None:
        result = dict(outcome.result or {})
        result.pop("ok", None)
        record |= result
        record["peak_host_rss_gib"] = round(max(outcome.peak_rss_bytes / GIB, result.get("peak_rss_self_gib", 0)), 2)
        record |= {"wall_s": outcome.wall_s, "timeout_s": round(timeout_s or 0)}
    return record


NOT_RUN = "not run: out of session time"


def probe_record(config: Config, deadline: float | None, log_path: Path, only: str = "all") -> dict:
    """The probe's figures; `only` names a subset of its measurements (bench/probe.py --only)."""
    limit = time_limit(config.probe_timeout_s, only == "all" or "cpu_deepspeed_adam" in only, config, deadline)
    if limit is None:
        return {"kind": "probe", "status": "not_run", "cause": NOT_RUN}
    argv = [sys.executable, "-m", "bench.probe", *([] if only == "all" else ["--only", only])]
    outcome = run_child(argv, limit, log_path, "probe")
    status, cause = classify(outcome, limit)
    figures = {key: value for key, value in (outcome.result or {}).items() if key != "ok"}
    return {"kind": "probe", "status": status, "cause": cause, **figures, "wall_s": outcome.wall_s}


def measure(cell: PlannedCell, config: Config, args: argparse.Namespace, overrides: dict[str, int],
            deadline: float | None, log_path: Path, estimate: float | None = None) -> dict:
    """Runs one cell. Where the call's deadline leaves the cell less than its own time limit, the cell is not
    started if its estimate says it cannot finish, and a cell the deadline cuts is recorded as not run (a later
    call measures it), never as a timeout of its method."""
    if cell.skip:
        record = cell_record(cell, "skipped", cell.skip)
        return record | {"inferred_from": cell.inferred_from} if cell.inferred_from else record
    own_limit, limit = cell_limit(cell, config, args, None), cell_limit(cell, config, args, deadline)
    if limit is None:
        return cell_record(cell, "not_run", NOT_RUN)
    cut_by_deadline = limit < own_limit
    if cut_by_deadline and estimate is not None and estimate > limit:
        return cell_record(cell, "not_run", f"{NOT_RUN}: needs ~{estimate:.0f} s by its method's measured cells, "
                                            f"{limit:.0f} s left")
    argv = [sys.executable, "-m", "bench.cell", "--size", cell.size, "--method", cell.method.name,
            "--regime", cell.regime.name, "--device", args.device, "--config", str(args.config),
            "--time-limit-s", f"{limit:.1f}", *override_arguments(overrides)]
    limits = {}
    if cell.profile is not None:
        argv += ["--profile", cell.profile.name]
        limits["host_limit_bytes"] = int(cell.profile.host_memory_gib * GIB)
    outcome = run_child(argv, limit, log_path, cell.name, **limits)
    status, cause = classify(outcome, limit)
    if status == "timeout" and cut_by_deadline:
        if _predicted_beyond(outcome, cell, own_limit):
            cause += f" ({BEYOND_OWN_LIMIT} {own_limit:.0f} s limit)"
        else:
            status, cause = "not_run", f"{NOT_RUN}: cut at {limit:.0f} s of its {own_limit:.0f} s ({cause})"
    return cell_record(cell, status, cause, outcome, limit)


def _predicted_beyond(outcome: ChildOutcome, cell: PlannedCell, own_limit: float) -> bool:
    """Whether a cell stopped by the predicted-timeout guard under the call's deadline would have been stopped
    under its own time limit too: then the timeout is its method's, not the call's (a later call would only repeat
    it)."""
    step_s = (outcome.result or {}).get("predicted_step_s")
    return step_s is not None and step_s * cell.regime.steps * PREDICTION_MARGIN > own_limit - outcome.wall_s


def list_cells(cells: list[PlannedCell], measured: list[dict], config: Config, args: argparse.Namespace) -> None:
    """What a run would start, with each cell's estimate, grouped into the calls of `--deadline-s` seconds that
    would run them (a cell without an estimate counted at its time limit), to split the rest of the matrix."""
    estimates = [estimate_s(cell, measured) for cell in cells]
    limits = [cell_limit(cell, config, args, None) for cell in cells]
    costs = [limit if estimate is None else min(estimate, limit) for estimate, limit in zip(estimates, limits)]
    groups = calls(costs, args.deadline_s) if args.deadline_s else [list(range(len(cells)))]
    for number, group in enumerate(groups, 1):
        if args.deadline_s:
            print(f"call {number}: ~{sum(costs[index] for index in group):.0f} s")
        for index in group:
            estimate = estimates[index]
            shown = cells[index].skip or ("?" if estimate is None else f"~{estimate:.0f} s")
            print(f"  {cells[index].name:<70} {shown}")
    unknown = sum(estimate is None for estimate in estimates)
    print(f"{len(cells)} cells, ~{sum(costs):.0f} s ({unknown} without an estimate: no measured cell of their "
          "method; counted at their time limit). A failure measured in a call answers its method's larger "
          "cells, which then take no time.")


def _path_option(value: Path | bool | None, default: Path) -> Path | None:
    """An option given as `--flag` (the results file) or `--flag PATH`."""
    return default if value is True else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--sizes", help="comma-separated, e.g. 1.5b,3.6b (default: the config's)")
    parser.add_argument("--methods", help="comma-separated method names (default: the config's)")
    parser.add_argument("--regimes", help="comma-separated, e.g. r1 (default: all)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--probe", nargs="?", const="all", help="measure the machine's ceilings first; or only "
                        "the named measurements (`python -m bench probe --only`), e.g. --probe model_matmuls,model_attention")
    parser.add_argument("--profile", help="run the cells as a smaller machine, emulated by memory budgets "
                        "(bench/matrix.yaml `profiles`, e.g. 24gb_64gib); results default to results_<profile>.jsonl")
    parser.add_argument("--results", type=Path, help="JSON lines, appended to (default: bench/results.jsonl)")
    parser.add_argument("--log", type=Path, help="every child's output (default: the results path, .log)")
    parser.add_argument("--timeout-s", type=float, help="per-cell time limit (default: the config's)")
    parser.add_argument("--deadline-s", type=float, help="stop starting cells once this many seconds have passed")
    parser.add_argument("--skip-known-failures", nargs="?", const=True, type=Path, metavar="RESULTS",
                        help="skip the cells that a failure measured in RESULTS (default: --results) already "
                             "answers: the same method out of memory, killed or refused at a smaller size or at the "
                             "same size without accumulation, or timed out (or predicted to) under this time limit "
                             "at a smaller size or with fewer micro-batches; the record names that cell")
    parser.add_argument("--unmeasured", nargs="?", const=True, type=Path, metavar="RESULTS",
                        help="run only the cells that RESULTS (default: --results) does not answer yet: never "
                             "measured, not reached by an earlier call, or measured before a change that made the "
                             "figure out of date (matrix.yaml `superseded`)")
    parser.add_argument("--list", action="store_true",
                        help="print the cells a run would start, each with its estimated time (grouped into calls "
                             "of --deadline-s seconds), and run nothing")
    parser.add_argument("--report", type=Path, help="render this markdown file (and a .png beside it) at the end")
    add_override_arguments(parser)
    args = parser.parse_args()
    args.results = args.results or BENCH / (f"results_{args.profile}.jsonl" if args.profile else "results.jsonl")
    config = load_config(args.config)
    overrides = overrides_from(args)
    cells = expand(config, parse_list(args.sizes), parse_list(args.methods), parse_list(args.regimes), args.device,
                   overrides, args.profile)
    history_paths = {path for path in (args.results, _path_option(args.skip_known_failures, args.results),
                                       _path_option(args.unmeasured, args.results)) if path and path.exists()}
    history = {}
    if history_paths:
        from bench.report import load

        history = load(sorted(history_paths), config.superseded)[1]
    if args.unmeasured:
        cells = unmeasured(cells, history)
    measured = list(history.values())
    timeout_s = args.timeout_s or config.timeout_s
    if args.list:
        listed = skip_known_failures(cells, measured, timeout_s) if args.skip_known_failures else cells
        list_cells(listed, measured, config, args)
        return
    deadline = time.monotonic() + args.deadline_s if args.deadline_s else None
    log_path = args.log or args.results.with_suffix(".log")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "bench", "run", *sys.argv[1:]])

    def append(record: dict) -> None:
        record |= {"command": command, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        with open(args.results, "a") as results:
            results.write(json.dumps(record) + "\n")
        detail = record.get("cause") or (f"{record['step_s_median']} s/step" if "step_s_median" in record else "")
        print(f"{record.get('cell', 'probe')}: {record['status']} {detail}", flush=True)

    if args.probe:
        append(probe_record(config, deadline, log_path, args.probe))
    for cell in cells:
        if args.skip_known_failures:  # also by the failures this call measures: 8B killed answers 14.8B at once
            [cell] = skip_known_failures([cell], measured, timeout_s)
        record = measure(cell, config, args, overrides, deadline, log_path, estimate_s(cell, measured))
        append(record)
        measured.append(record)
    if args.report:
        from bench.report import write_report

        write_report([args.results], args.report)


if __name__ == "__main__":
    main()
